"""The one validating reader of results files: bytes in, checked numpy data out.

Everything is checked against :data:`curvscope.store.schema.RESULTS` (structure, element
kinds, shapes, allowed strings, cross-member rules) before it is returned, and every
failure, including whatever HDF5 raises on a truncated or corrupted file, becomes a
:class:`~curvscope.errors.CurvscopeError` that names what is wrong. Only the members the
schema declares are read; links to elsewhere, external or virtual storage and unknown
filters are refused, so reading a stranger's file touches nothing but that file.
"""
from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from curvscope import __version__
from curvscope.errors import CurvscopeError
from curvscope.store.schema import (
    BOOL,
    FLOAT,
    FORMAT,
    INT,
    KIND_NAMES,
    NAME_PATTERN,
    RESULTS,
    SCHEMA_VERSION,
    STR,
    Attr,
    Data,
    Dim,
    Group,
)

#: What h5py and numpy raise on damaged input.
READ_ERRORS = (OSError, LookupError, TypeError, ValueError, RuntimeError, ArithmeticError, MemoryError,
               AttributeError)
#: HDF5's signature, at offset 0 or (after a user block) 512, 1024, 2048, …
SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Filters HDF5 applies itself (deflate, shuffle, fletcher32, szip, nbit, scaleoffset) and h5py's lzf.
BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
#: A dataset may unpack to at most this many times the file's size (compression), plus 1 MiB.
EXPANSION = 100
ADVICE = ("The file is damaged or was not written by curvscope: use an intact copy, or analyse the "
          "checkpoints again into a new results file (curvscope analyse CHECKPOINT... -o NEW.h5).")


class Invalid(Exception):
    """A violation of the schema, described by where it is and what is wrong (no file name)."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """One /checkpoints/<label> group read back: attributes and every dataset as numpy."""

    label: str
    attrs: dict
    data: dict  # dataset path inside the group -> np.ndarray (strings decoded) or Python scalar
    data_attrs: dict  # dataset or subgroup path -> attrs dict

    def __getitem__(self, key: str) -> np.ndarray:
        return self.data[key]


@dataclass(frozen=True)
class ResultsFile:
    """A whole results file, checked: its root attributes and its checkpoints in label order."""

    name: str
    schema_version: int
    curvscope_version: str
    checkpoints: list[StoredCheckpoint]


@dataclass
class _Tree:
    """What one walk collects: datasets and attributes by path relative to where it started."""

    data: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def below(self, prefix: str) -> tuple[dict, dict]:
        """The datasets and attributes under `prefix`, by paths relative to it (the rules' view)."""
        if not prefix:
            return self.data, self.attrs
        cut = len(prefix) + 1
        return ({k[cut:]: v for k, v in self.data.items() if k.startswith(prefix + "/")},
                {("" if k == prefix else k[cut:]): v for k, v in self.attrs.items()
                 if k == prefix or k.startswith(prefix + "/")})


class _Dims:
    """Named dimensions, each bound by the innermost enclosing group that declares it."""

    def __init__(self) -> None:
        self._frames: list[tuple[dict[str, int], dict[str, int]]] = [({}, {})]  # (declared minima, bound sizes)

    @contextmanager
    def scope(self, declared: dict[str, int]) -> Iterator[None]:
        """Within: the dimensions `declared` (name -> least size) are bound afresh."""
        self._frames.append((declared, {}))
        try:
            yield
        finally:
            self._frames.pop()

    def _frame(self, name: str) -> tuple[dict[str, int], dict[str, int]]:
        """The innermost frame declaring `name` (the innermost of all when none does)."""
        return next((f for f in reversed(self._frames) if name in f[0]), self._frames[-1])

    def expected(self, shape: tuple[Dim, ...]) -> tuple[int | None, ...]:
        """The lengths `shape` stands for now (None: free or not yet bound)."""
        return tuple(d if isinstance(d, int) or d is None else self._frame(d)[1].get(d) for d in shape)

    def match(self, shape: tuple[Dim, ...], actual: tuple[int, ...]) -> str | None:
        """Bind the unbound dimensions of `shape` to `actual`, or say how they disagree."""
        expected = self.expected(shape)
        want = f"({', '.join(':' if d is None else str(d) for d in shape)}{',' if len(shape) == 1 else ''})"
        if any(isinstance(d, str) for d in shape) and None not in expected:
            want += f" = {tuple(expected)}"
        mismatch = f"has shape {tuple(actual)}, expected {want}"
        if len(actual) != len(shape):
            return mismatch
        for d, a in zip(shape, actual):
            if isinstance(d, int) and d != a:
                return mismatch
            if isinstance(d, str):
                declared, bound = self._frame(d)
                if bound.setdefault(d, a) != a:
                    return mismatch
                if a < declared.get(d, 0):
                    return f"has shape {tuple(actual)}, expected {d} >= {declared[d]}"
        return None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextmanager
def _guard(where: str) -> Iterator[None]:
    """Turn whatever HDF5 raises while reading `where` into Invalid."""
    try:
        yield
    except READ_ERRORS as exc:
        raise Invalid(f"{where} cannot be read ({_one_line(exc)})") from None


def _kind(dtype: np.dtype) -> str | None:
    """The schema kind of HDF5 elements of `dtype`, or None for anything else (compound, vlen, opaque …)."""
    if h5py.check_string_dtype(dtype) is not None:
        return STR
    return {"b": BOOL, "i": INT, "u": INT, "f": FLOAT}.get(dtype.kind) if dtype.fields is None else None


def _check_kind(what: str, dtype: np.dtype, want: str) -> None:
    """Refuse elements of `dtype` where the schema wants the kind `want`."""
    kind = _kind(dtype)
    if kind != want:
        found = f"{KIND_NAMES[kind]} ({dtype})" if kind else f"of unsupported type {dtype}"
        raise Invalid(f"{what} is {found}, expected {KIND_NAMES[want]}")


def _decode(value: Any, what: str) -> Any:
    """Strings as str (arrays as numpy str arrays), numpy scalars as Python scalars."""
    try:
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in value.ravel()],
                              dtype=str).reshape(value.shape)
    except UnicodeDecodeError:
        raise Invalid(f"{what} holds bytes that are not UTF-8 text") from None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_choices(what: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse strings outside `choices` (when the schema names any)."""
    if choices:
        bad = sorted({str(v) for v in np.atleast_1d(value)} - set(choices))
        if bad:
            raise Invalid(f"{what} holds {', '.join(map(repr, bad))}, expected one of "
                          f"{', '.join(map(repr, choices))}")


def _read_attrs(obj: h5py.HLObject, spec: dict[str, Attr], where: str, dims: _Dims) -> dict:
    """The declared attributes of `obj`, checked, and the undeclared ones that are scalars of a known kind."""
    out = _undeclared_attrs(obj, spec, where)
    for name, attr in spec.items():
        what = f"attribute {name}" + (f" of {where}" if where else "")
        with _guard(what):
            if name not in obj.attrs:
                if attr.required:
                    raise Invalid(f"{what} is missing")
                continue
            aid = obj.attrs.get_id(name)
            _check_kind(what, aid.dtype, attr.kind)
            if aid.shape is None:
                raise Invalid(f"{what} is empty")
            problem = dims.match(attr.shape, tuple(aid.shape))
            if problem:
                raise Invalid(f"{what} {problem}")
            value = _decode(obj.attrs[name], what)
        _check_choices(what, value, attr.choices)
        out[name] = value
    return out


def _undeclared_attrs(obj: h5py.HLObject, spec: dict[str, Attr], where: str) -> dict:
    """Attributes the schema does not declare (a newer writer's, say), passed on when they are scalar
    strings, numbers or flags; any other is left unread."""
    out = {}
    with _guard(f"the attributes of {where or 'the group'}"):
        for name in obj.attrs:
            aid = obj.attrs.get_id(name)
            if name not in spec and _kind(aid.dtype) is not None and aid.shape == ():
                try:
                    out[name] = _decode(obj.attrs[name], name)
                except Invalid:
                    continue
    return out


def _child(group: h5py.Group, name: str, where: str) -> h5py.HLObject | None:
    """Member `name` of `group` when it exists as a hard link; links elsewhere are refused."""
    with _guard(where):
        link = group.get(name, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise Invalid(f"{where} is {kind}; results files hold no links")
        return group[name]


def _check_storage(ds: h5py.Dataset, where: str, limit: int) -> None:
    """Refuse data kept outside the file, filters HDF5 would load as plugins, and impossible sizes."""
    if ds.is_virtual or ds.external:
        raise Invalid(f"dataset {where} keeps its data outside the file (external or virtual storage)")
    plist = ds.id.get_create_plist()
    codes = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if codes - BUILTIN_FILTERS:
        raise Invalid(f"dataset {where} uses HDF5 filter(s) {sorted(codes - BUILTIN_FILTERS)} curvscope does not load")
    if ds.size * ds.dtype.itemsize > limit:
        raise Invalid(f"dataset {where} declares {ds.size} elements, more than a file of this size can hold")


def _read_data(ds: h5py.HLObject, spec: Data, where: str, dims: _Dims, limit: int, tree: _Tree) -> None:
    """Check the dataset `ds` (at `where`) against `spec` before reading it into `tree`."""
    if not isinstance(ds, h5py.Dataset):
        raise Invalid(f"{where} is a group, expected a dataset")
    with _guard(f"dataset {where}"):
        _check_kind(f"dataset {where}", ds.dtype, spec.kind)
        problem = dims.match(spec.shape, ds.shape)
        if problem:
            raise Invalid(f"dataset {where} {problem}")
        _check_storage(ds, where, limit)
        value = _decode(ds[()], f"dataset {where}")
    _check_choices(f"dataset {where}", value, spec.choices)
    tree.data[where] = value
    tree.attrs[where] = _read_attrs(ds, dict(spec.attrs), where, dims)


def _read_group(grp: h5py.HLObject, spec: Group, where: str, dims: _Dims, limit: int, tree: _Tree) -> None:
    """Check the group `grp` (at `where`, "" for the walk's start) against `spec`, collecting into `tree`."""
    if not isinstance(grp, h5py.Group):
        found = "a dataset" if isinstance(grp, h5py.Dataset) else "not a group"
        raise Invalid(f"{where or 'the checkpoint'} is {found}, expected a group")
    with dims.scope(dict(spec.dims)):
        tree.attrs[where] = _read_attrs(grp, dict(spec.attrs), where, dims)
        for name, member in spec.members.items():
            path = f"{where}/{name}" if where else name
            item = _child(grp, name, path)
            if item is None:
                if isinstance(member, Group) and member.optional:
                    continue
                raise Invalid(f"{'group' if isinstance(member, Group) else 'dataset'} {path} is missing")
            if isinstance(member, Group):
                _read_group(item, member, path, dims, limit, tree)
            else:
                _read_data(item, member, path, dims, limit, tree)
        if spec.each is not None:
            for name in _names(grp, where):
                path = f"{where}/{name}" if where else name
                _read_group(_child(grp, name, path), spec.each, path, dims, limit, tree)
        for rule in spec.rules:
            problem = rule(*tree.below(where))
            if problem:
                raise Invalid(f"{where + ': ' if where else ''}{problem}")


def _names(grp: h5py.Group, where: str) -> list[str]:
    """The member names of `grp`, sorted, each a printable name."""
    with _guard(where or "the group"):
        names = sorted(grp.keys())
    for name in names:
        if not re.fullmatch(NAME_PATTERN, name):
            raise Invalid(f"{where + ' holds' if where else 'holds'} a member named {name!r}, not a printable name")
    return names


def _root_header(fh: h5py.File, name: str) -> tuple[int, str]:
    """Format and schema version, checked before the layout (a newer schema may lay things out otherwise)."""
    with _guard("the root attributes"):
        fmt = fh.attrs["format"] if "format" in fh.attrs else None  # noqa: SIM401 - .get hides a KeyError of HDF5
    if not isinstance(fmt, (str, bytes)) or _decode(fmt, "attribute format") != FORMAT:
        raise CurvscopeError(f"{name!r} is an HDF5 file but not a curvscope results file.")
    version = _read_attrs(fh, {"schema_version": RESULTS.attrs["schema_version"]}, "", _Dims())["schema_version"]
    if version > SCHEMA_VERSION:
        raise CurvscopeError(f"{name!r} uses results schema version {version}, newer than the version "
                             f"{SCHEMA_VERSION} this curvscope ({__version__}) reads: upgrade curvscope.")
    if version < 1:
        raise Invalid(f"attribute schema_version is {version}, expected {SCHEMA_VERSION}")
    rest = _read_attrs(fh, dict(RESULTS.attrs), "", _Dims())
    return version, str(rest.get("curvscope_version", "?"))


def _checkpoints(fh: h5py.File, limit: int) -> list[StoredCheckpoint]:
    """Every /checkpoints/<label> group, checked, in label order (none when there is no /checkpoints)."""
    spec = RESULTS.members["checkpoints"]
    assert isinstance(spec, Group) and spec.each is not None
    grp = _child(fh, "checkpoints", "checkpoints")
    if grp is None:
        return []
    if not isinstance(grp, h5py.Group):
        raise Invalid("checkpoints is a dataset, expected a group")
    out = []
    for label in _names(grp, "checkpoints"):
        tree = _Tree()
        try:
            _read_group(_child(grp, label, f"checkpoints/{label}"), spec.each, "", _Dims(), limit, tree)
        except Invalid as exc:
            raise Invalid(f"checkpoint {label!r}: {exc}") from None
        attrs = tree.attrs.pop("")
        out.append(StoredCheckpoint(label, attrs, tree.data, tree.attrs))
    return out


def holds_hdf5(path: Path) -> bool:
    """Whether the file at `path` carries HDF5's signature in its first 64 KiB, where HDF5 looks for it."""
    with path.open("rb") as fh:
        return looks_like_hdf5(fh.read(1 << 16))


def looks_like_hdf5(data: bytes) -> bool:
    """Whether `data` carries HDF5's signature where HDF5 looks for it."""
    offset = 0
    while offset + len(SIGNATURE) <= len(data):
        if data[offset:offset + len(SIGNATURE)] == SIGNATURE:
            return True
        offset = 512 if offset == 0 else 2 * offset
    return False


def parse(data: bytes, name: str) -> ResultsFile:
    """The results file whose bytes are `data` (`name` is how messages call it), checked against the schema."""
    if not looks_like_hdf5(data):
        raise CurvscopeError(f"{name!r} is not an HDF5 file (is it a checkpoint rather than results?).")
    limit = EXPANSION * len(data) + 2**20
    try:
        with h5py.File(io.BytesIO(data), "r") as fh:
            version, written_by = _root_header(fh, name)
            return ResultsFile(name, version, written_by, _checkpoints(fh, limit))
    except Invalid as exc:
        raise CurvscopeError(f"{name!r} is not a valid curvscope results file: {exc}. {ADVICE}") from None
    except READ_ERRORS as exc:
        raise CurvscopeError(f"{name!r} cannot be read as a curvscope results file ({_one_line(exc)}). "
                             f"{ADVICE}") from None
