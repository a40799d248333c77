"""torch.export programs (.pt2), loaded without running code from the file (issue #13).

`torch.export.load` runs code from a crafted archive in several ways (torch 2.13):

* pickled members: ``data/sample_inputs/<m>.pt`` and the legacy ``data/weights/<m>.pt`` /
  ``data/constants/<m>.pt`` go through `serialize.deserialize_torch_artifact`, which retries a
  failed ``torch.load(weights_only=True)`` with ``weights_only=False``; weights and ``tensor_*``
  constants marked ``use_pickle`` are read by `_package._load_state_dict` / `_load_constants` with
  ``torch.load(weights_only=False)``; ``opaque_obj_*`` constants with ``pickle.loads`` and
  ``custom_obj_*`` ones with ``torch._C._pickle_load_obj``; the pre-2.8 layout
  (``serialized_*.pt``) through `deserialize_torch_artifact` again;
* ``data/aotinductor/`` holds compiled shared libraries that `_package._load_aoti` loads;
* the program's JSON: ``expr_str`` shape expressions go to ``sympy.sympify`` (Python ``eval``),
  and names (parameter FQNs, ``forward_arg_names``, keyword names in ``in_spec``) are pasted
  unescaped into the Python source that ``ExportedProgram.module()`` generates and executes, as
  is ``guards_code`` (with ``check_guards=True``).

`load_exported_program` therefore reads the archive with `zipfile` (so damage is found before torch
parses anything), checks its layout, refuses names that are not plain names and expressions that
are not plain shape expressions, hands torch a re-packed copy of exactly the bytes it checked, and
while torch loads it (`_restricted`) lets pickled members through only torch's restricted
unpickler and refuses custom objects and compiled code. With ``trust=True`` (``--trust-checkpoint``)
the file is loaded as torch would, for files the user made.
"""
from __future__ import annotations

import ast
import copy
import io
import json
import logging
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvscope.errors import CurvscopeError

#: Strings in a program's JSON that torch keeps as data and never turns into code.
FREE_TEXT = frozenset({"metadata", "stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom",
                       "as_string", "as_strings", "torch_version", "guards_code"})
#: JSON-encoded pytree specs, whose strings are checked after decoding.
SPEC_KEYS = frozenset({"in_spec", "out_spec", "context"})
SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]*\Z")
#: Folders whose JSON members torch interprets: the programs, and their weights and constants configs.
INTERPRETED_JSON = ("models/", "data/weights/", "data/constants/")
#: What a shape expression (sympy's srepr of a size) may call: sympy's and torch's size arithmetic.
SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "And", "Or", "Not", "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity"})
SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo"})
ASSUMPTIONS = frozenset({"integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite",
                         "zero", "nonzero", "commutative", "even", "odd"})
GROWING = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})  # results whose size grows with an argument
MAX_EXPRESSION = 20_000  # characters
MAX_INT = 2 ** 64
UNSAFE_ADVICE = ("weights_only", "re-running", "allow_pickle")
QUIET_LOGGERS = ("torch._export.serde.serialize", "torch.export.pt2_archive._package")
_LOCK = threading.Lock()  # the patches of `_restricted` are process-wide: one load at a time


class Exported(nn.Module):
    """A torch.export program's module; its mode was fixed at export, so train()/eval() only set the flag."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.exported = program

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.exported(*args)

    def train(self, mode: bool = True) -> Exported:
        self.training = mode
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Exported:
        """A deep copy, without the FutureWarning torch's own pytree specs raise when copied (torch 2.13)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class _Refused(Exception):
    """Raised inside torch's loader where it would run code from the file."""


def load_exported_program(path: str | Path, *, trust: bool = False) -> Exported:
    """The module of the torch.export program in `path` (a .pt2 archive), loaded without running its code.

    Without `trust`, pickled members load only through torch's restricted unpickler, and an archive
    that needs more (Python objects, TorchScript custom objects, AOTInductor code, names or
    expressions that would become code) is refused with a CurvscopeError; so is a damaged archive.
    """
    path = Path(path)
    where = repr(str(path))
    if not path.is_file():
        raise CurvscopeError(f"checkpoint {where} does not exist.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CurvscopeError(f"checkpoint {where} cannot be read: {_describe(exc)}.") from None
    members = _read_archive(raw, where)
    short = _check_layout(members, where, trust)
    if not trust:
        for name, data in short.items():
            if name.startswith(INTERPRETED_JSON) and name.endswith(".json"):
                _check_json(name, data, where)
    buffer = _repack(members)
    refusals: list[str] = []
    try:
        with _restricted(trust, refusals):
            module = _build(buffer)
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch fails on malformed programs in many ways
        if refusals:
            raise CurvscopeError(_needs_trust(where, refusals[0])) from None
        raise CurvscopeError(f"{where} is not a readable torch.export program ({_describe(exc)}).") from None
    if refusals:  # torch caught the refusal and carried on
        raise CurvscopeError(_needs_trust(where, refusals[0]))
    return Exported(module)


def _needs_trust(where: str, what: str) -> str:
    return (f"{where} holds {what}, which can only be loaded by running code from the file; curvscope "
            "refuses to do that unless you trust the file: re-export the program with torch.export.save "
            "from plain tensors (no pickled objects, custom objects or AOTInductor code), or pass "
            "--trust-checkpoint only if you made the file yourself.")


def _describe(exc: BaseException) -> str:
    """The first line of an exception, without torch's advice to unpickle unsafely."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if any(bad in text.lower() for bad in UNSAFE_ADVICE):
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_archive(data: bytes, where: str) -> dict[str, bytes]:
    """Every member of the zip archive `data`, CRC-checked; damage raises CurvscopeError."""
    import zipfile

    if not data:
        raise CurvscopeError(f"checkpoint {where} is empty (0 bytes).")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise CurvscopeError(f"{where} is not a readable torch.export program (it lists a member twice).")
            if sum(i.file_size for i in infos) > 64 * len(data) + (1 << 20):
                raise CurvscopeError(f"{where} is not a readable torch.export program (its members would unpack "
                                     "to far more than the file's size).")
            return {i.filename: archive.read(i) for i in infos}
    except CurvscopeError:
        raise
    except zipfile.BadZipFile as exc:
        what = "not a zip archive" if "not a zip file" in str(exc) else f"a damaged zip archive: {_describe(exc)}"
        raise CurvscopeError(f"{where} is not a readable torch.export program ({what}).") from None
    except Exception as exc:  # noqa: BLE001 - zipfile fails on damaged archives in many ways
        raise CurvscopeError(f"{where} is not a readable torch.export program (a damaged zip archive: "
                             f"{_describe(exc)}).") from None


def _check_layout(members: dict[str, bytes], where: str, trust: bool) -> dict[str, bytes]:
    """The members by name below the archive's folder, once they are seen to be a torch.export.save archive."""
    from torch.export.pt2_archive import constants as c

    roots = {name.split("/", 1)[0] for name in members}
    if "serialized_exported_program.json" in members:
        raise CurvscopeError(f"{where} is a torch.export archive in the layout of torch 2.7 or older, which "
                             "curvscope does not read: export the program again with torch.export.save.")
    if len(roots) != 1 or not all("/" in name for name in members):
        raise CurvscopeError(f"{where} is not a readable torch.export program (its members do not share one "
                             "folder, as torch.export.save writes them).")
    root = roots.pop() + "/"
    short = {name[len(root):]: data for name, data in members.items()}

    def damaged(why: str) -> CurvscopeError:
        return CurvscopeError(f"{where} is not a readable torch.export program ({why}).")

    if short.get(c.ARCHIVE_FORMAT_PATH) != c.ARCHIVE_FORMAT_VALUE.encode():
        raise damaged(f"no {c.ARCHIVE_FORMAT_PATH!r} member saying {c.ARCHIVE_FORMAT_VALUE!r}")
    if short.get(c.ARCHIVE_VERSION_PATH) != c.ARCHIVE_VERSION_VALUE.encode():
        raise damaged(f"archive version {short.get(c.ARCHIVE_VERSION_PATH, b'(none)')[:20]!r}; curvscope reads "
                      f"version {c.ARCHIVE_VERSION_VALUE}")
    models = [n[len(c.MODELS_DIR):-len(".json")] for n in short if n.startswith(c.MODELS_DIR) and n.endswith(".json")]
    if "model" not in models:
        raise damaged(f"no program named 'model' ({c.MODELS_FILENAME_FORMAT.format('model')})")
    for model in models:
        needed = [c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model),
                  (c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), f"{c.WEIGHTS_DIR}{model}.pt"),
                  (c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), f"{c.CONSTANTS_DIR}{model}.pt")]
        for need in needed:
            options = need if isinstance(need, tuple) else (need,)
            if not any(o in short for o in options):
                raise damaged(f"the member {options[0]!r} is missing")
        for config, folder in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT, c.WEIGHTS_DIR),
                               (c.CONSTANTS_CONFIG_FILENAME_FORMAT, c.CONSTANTS_DIR)):
            if config.format(model) in short:
                _check_payloads(short, config.format(model), folder, damaged)
    if not trust and any(n.startswith(c.AOTINDUCTOR_DIR) for n in short):
        raise CurvscopeError(_needs_trust(where, f"AOTInductor compiled code ({c.AOTINDUCTOR_DIR})"))
    return short


def _check_payloads(short: dict[str, bytes], config: str, folder: str,
                    damaged: Callable[[str], CurvscopeError]) -> None:
    """Each raw tensor of a weights/constants config has its member; none is conjured from an empty one."""
    try:
        entries = json.loads(short[config])["config"]
        for fqn, meta in entries.items():
            if meta.get("use_pickle") or not str(meta["path_name"]).startswith(("weight_", "tensor_")):
                continue  # pickled: read by torch.load under `_restricted`, or refused there
            record = folder + meta["path_name"]
            if record not in short:
                raise damaged(f"the member {record!r} of {fqn!r} is missing")
            numel = 1
            for size in meta["tensor_meta"]["sizes"]:
                numel *= int(size.get("as_int", 0))
            if not short[record] and numel:
                raise damaged(f"{fqn!r} declares {numel} elements but its member is empty")
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged config fails in many ways
        raise damaged(f"{config!r} is malformed: {_describe(exc)}") from None


def _check_json(name: str, data: bytes, where: str) -> None:
    """Refuse a JSON member whose names or shape expressions torch would turn into code unsafely."""
    try:
        tree = json.loads(data)
    except Exception as exc:  # noqa: BLE001 - RecursionError, UnicodeDecodeError, ValueError, ...
        raise CurvscopeError(f"{where} is not a readable torch.export program ({name!r} is not JSON: "
                             f"{_describe(exc)}).") from None
    problem = _unsafe_json(tree)
    if problem:
        raise CurvscopeError(f"{where} holds {problem} in {name!r}, which curvscope will not turn into code; "
                             "re-export the program with torch.export.save, or pass --trust-checkpoint only "
                             "if you made the file yourself.")


def _unsafe_json(tree: Any) -> str | None:
    """What in a program's JSON is not a plain name or shape expression (None when all is)."""
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        key, value = stack.pop()
        if key in FREE_TEXT:
            continue
        if key == "expr_str":
            why = _unsafe_expression(value) if isinstance(value, str) else "it is not a string"
            if why:
                return f"a shape expression {str(value)[:60]!r} ({why})"
        elif isinstance(value, dict):
            for k, v in value.items():
                if not SAFE_NAME.match(k):
                    return f"the name {k[:60]!r}"
                stack.append((k, v))
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str) and key in SPEC_KEYS and value[:1] in ('[', '{', '"', 'n'):
            try:
                stack.append((key, json.loads(value)))
            except Exception:  # noqa: BLE001 - not JSON: then it must be a plain name
                if not SAFE_NAME.match(value):
                    return f"the name {value[:60]!r}"
        elif isinstance(value, str) and not SAFE_NAME.match(value):
            return f"the name {value[:60]!r}"
    return None


def _unsafe_expression(text: str) -> str | None:
    """Why ``sympy.sympify`` must not see `text` (None when it is sympy's srepr of a size expression)."""
    if len(text) > MAX_EXPRESSION:
        return "it is too long"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "it is not an expression"
    growing = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_CALLS:
                return "it calls something other than sympy's size arithmetic"
            for kw in node.keywords:
                ok = (kw.arg in ASSUMPTIONS and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool)
                      or kw.arg == "precision" and isinstance(kw.value, ast.Constant)
                      and type(kw.value.value) is int and 0 < kw.value.value <= 1024)
                if not ok:
                    return f"it passes {kw.arg}="
            if node.func.id in GROWING:
                growing += 1
                if len(node.args) != 2 or not _small_or_symbol(node.args[1], 64 if node.func.id == "LShift" else 8):
                    return "it raises to a large or computed power"
        elif isinstance(node, ast.Name):
            if node.id not in SYMPY_CALLS | SYMPY_NAMES:
                return f"it names {node.id[:30]!r}"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and (len(value) > 64 or not re.fullmatch(r"[A-Za-z0-9_.+\-]*", value)):
                return "it holds an unusual string"
            if isinstance(value, str) and value.lstrip("+-").isdigit() and len(value) > 20:
                return "it holds a huge number"
            if isinstance(value, (int, float)) and abs(value) > MAX_INT:
                return "it holds a huge number"
            if not isinstance(value, (str, int, float)):
                return "it holds an unusual constant"
        elif not isinstance(node, (ast.Expression, ast.keyword, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd)):
            return f"it uses Python syntax ({type(node).__name__}) that sympy's srepr never writes"
    return "it raises to powers too often" if growing > 2 else None


def _small_or_symbol(node: ast.expr, bound: int) -> bool:
    """Whether `node` is Symbol(...) or a number (Integer, Rational, Float or literal) of at most `bound`."""
    if isinstance(node, ast.UnaryOp):
        return _small_or_symbol(node.operand, bound)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and abs(node.value) <= bound
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "Symbol":
            return True
        return node.func.id in ("Integer", "Rational", "Float") and all(
            not isinstance(a, ast.Call) and _small_or_symbol(a, bound) for a in node.args)
    return False


def _repack(members: dict[str, bytes]) -> io.BytesIO:
    """A fresh zip of exactly the checked members, so torch parses no bytes curvscope did not check."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def _build(buffer: io.BytesIO) -> nn.Module:
    """The unlifted module of the program "model" in `buffer` (guards are checked by a pre-hook, not exec'd code)."""
    try:
        from torch.export.pt2_archive._package import load_pt2
    except ImportError:
        raise CurvscopeError("this torch cannot read .pt2 programs safely: install torch 2.8 or later.") from None
    program = load_pt2(buffer).exported_programs["model"]
    try:
        return program.module(check_guards=False)
    except TypeError:  # a torch without guard functions
        return program.module()


@contextmanager
def _restricted(trust: bool, refusals: list[str]) -> Iterator[None]:
    """While torch loads a program: pickles only through its restricted unpickler, no custom objects or compiled code.

    Patches ``torch.load``, ``torch._C._pickle_load_obj`` and, in torch's pt2 archive reader, ``pickle``
    and ``_load_aoti``, and restores them on exit. Each refusal is appended to `refusals` and raised
    as `_Refused`. With `trust`, nothing is patched.
    """
    if trust:
        with _quiet():
            yield
        return
    from torch import _weights_only_unpickler
    from torch.export.pt2_archive import _package

    real_load = torch.load

    def refuse(what: str) -> _Refused:
        refusals.append(what)
        return _Refused(what)

    def restricted_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
                warnings.simplefilter("ignore", UserWarning)
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _pickled_objects(exc, refuse) from None

    def restricted_loads(data: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return _weights_only_unpickler.load(io.BytesIO(data))
        except pickle.UnpicklingError:
            raise refuse("a pickled Python object (opaque_obj_*)") from None

    def refuser(what: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise refuse(what)
        return refused

    patches = [(torch, "load", restricted_load),
               (torch._C, "_pickle_load_obj", refuser("a TorchScript custom object (custom_obj_*)")),
               (_package, "pickle", _PickleModule(restricted_loads)),
               (_package, "_load_aoti", refuser("AOTInductor compiled code"))]
    with _LOCK, _quiet():
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, new in patches:
                setattr(owner, name, new)
            yield
        finally:
            for owner, name, old in saved:
                setattr(owner, name, old)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's loaders' logging (legacy-format notes, and a fallback warning whose format string is broken)."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    saved = [logger.disabled for logger in loggers]
    try:
        for logger in loggers:
            logger.disabled = True
        yield
    finally:
        for logger, disabled in zip(loggers, saved):
            logger.disabled = disabled


def _pickled_objects(exc: pickle.UnpicklingError, refuse: Callable[[str], _Refused]) -> Exception:
    """The refusal for a pickle that asks for a global torch's restricted unpickler does not allow."""
    asked = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"global[: ]+([\w.]+)", str(exc), re.IGNORECASE)
    if asked is None:  # not a request for code: a damaged pickle
        return ValueError("a pickled member of the archive is damaged")
    return refuse(f"pickled Python objects (one asks for {asked.group(1)[:80]})")


class _PickleModule:
    """``pickle`` as torch's pt2 reader sees it under `_restricted`: `loads` is the restricted one."""

    def __init__(self, loads: Callable[..., Any]) -> None:
        self.loads = loads

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)
