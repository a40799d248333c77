"""Hostile torch.export programs (.pt2) for the corpus of ``test_hostile.py`` (issue #13).

`code_archives` crafts archives that run code (creating the folder's marker file) when plain
``torch.export.load`` reads them, or when the module it returns is built or called: one per way
torch 2.13 turns archive content into code (see ``curvscope.sources.exported``). `damaged_archives`
writes archives that are truncated, bit-flipped, incomplete or not zips at all. `exported_cases`
turns both into command lines that must fail cleanly. Random damage is drawn from fixed seeds.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import TINY_MODEL
from hostile import MARKER_NAME, QUICK, HostileCase, existing_results

TINY_DATA = ["--data", "synthetic", "--data-kwargs", '{"shape": [12], "num_classes": 3, "n": 40}', "--loss", "nll"]
#: How each crafted archive is made to run its code in plain torch: loading it, or calling its module.
PLAIN_TORCH_RUNS = {"sample inputs exec": "load", "sample inputs os.system": "load", "weight use_pickle": "load",
                    "constant use_pickle": "load", "opaque object": "load", "legacy weights member": "load",
                    "legacy constants member": "load", "torch 2.7 layout": "load", "sympy expression": "load",
                    "parameter name": "call", "forward_arg_names": "call", "guards_code": "call"}
#: Crafted archives curvscope loads (ignoring what would be code) instead of refusing.
LOADS_SAFELY = {"guards_code"}


class Payload:
    """Unpickling an instance runs `call(*args)`."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


def words(text: str) -> str:
    """A regular expression for `text` that survives the CLI's line wrapping."""
    return r"\s*".join(re.escape(w) for w in text.split())


def export_tiny(path: Path) -> Path:
    """The tiny MLP of conftest, exported with a dynamic batch dimension and saved with torch.export.save."""
    from curvscope.sources.zoo import build_model

    torch.manual_seed(0)
    net = build_model("mlp", TINY_MODEL)
    program = torch.export.export(net, (torch.randn(4, 12),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def read_members(path: Path) -> tuple[str, dict[str, bytes]]:
    """The root folder of a .pt2 archive and its members by name below that folder."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0] + "/"
        return root, {n[len(root):]: archive.read(n) for n in names}


def rewrite(src: Path, dst: Path, changes: dict[str, bytes | str | None]) -> Path:
    """`src` with members replaced or added (None removes one), written to `dst`."""
    root, members = read_members(src)
    for name, data in changes.items():
        if data is None:
            members.pop(name, None)
        else:
            members[name] = data.encode() if isinstance(data, str) else data
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(root + name, data)
    return dst


def torch_saved(obj: Any) -> bytes:
    """`obj` as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _config(entries: dict[str, str]) -> str:
    """A constants config naming pickled members: {fqn: path_name}."""
    return json.dumps({"config": {fqn: {"path_name": name, "is_param": False, "use_pickle": True, "tensor_meta": None}
                                  for fqn, name in entries.items()}})


def code_archives(tmp: Path, marker: Path) -> dict[str, Path]:
    """Archives that run code creating `marker`, one per way torch turns archive content into code."""
    base = export_tiny(tmp / "base.pt2")
    _, members = read_members(base)
    run = f"open({str(marker)!r}, 'w').close()"
    exec_pickle, system_pickle = Payload(builtins.exec, run), Payload(os.system, f"touch '{marker}'")
    weights = json.loads(members["data/weights/model_weights_config.json"])
    weights["config"]["net.1.weight"]["use_pickle"] = True
    model = json.loads(members["models/model.json"])
    expr = re.search(r'"expr_str": "([^"]+)"', members["models/model.json"].decode()).group(1)
    signature = model["graph_module"]["module_call_graph"][0]["signature"]
    to_bytes = f"exec(bytes({list(run.encode())!r}).decode())"

    def program(edit: Callable[[dict], None]) -> str:
        tree = json.loads(members["models/model.json"])
        edit(tree)
        return json.dumps(tree)

    # a parameter name that closes the string FX's code generator puts it in: getattr(self, "<name>")
    fqn = json.dumps('net.1.bias"), exec(str(bytes(' + repr(list(run.encode())) + '), "ascii")), getattr(self, "net')
    kwargs_spec = json.loads(signature["in_spec"])
    kwargs_spec[1]["children_spec"][1]["context"] = json.dumps([f"k':0}}, {to_bytes}, {{'z"])
    crafted: dict[str, dict[str, bytes | str | None]] = {
        "sample inputs exec": {"data/sample_inputs/model.pt": torch_saved(exec_pickle)},
        "sample inputs os.system": {"data/sample_inputs/model.pt": torch_saved(system_pickle)},
        "weight use_pickle": {"data/weights/model_weights_config.json": json.dumps(weights),
                              "data/weights/weight_0": torch_saved(exec_pickle)},
        "constant use_pickle": {"data/constants/model_constants_config.json": _config({"c": "tensor_0"}),
                                "data/constants/tensor_0": torch_saved(exec_pickle)},
        "opaque object": {"data/constants/model_constants_config.json": _config({"c": "opaque_obj_0"}),
                          "data/constants/opaque_obj_0": pickle.dumps(exec_pickle)},
        "custom object": {"data/constants/model_constants_config.json": _config({"c": "custom_obj_0"}),
                          "data/constants/custom_obj_0": pickle.dumps(exec_pickle)},
        "legacy weights member": {"data/weights/model.pt": torch_saved(exec_pickle)},
        "legacy constants member": {"data/constants/model.pt": torch_saved(exec_pickle)},
        "aotinductor library": {"data/aotinductor/model/model.so": b"\x7fELF" + bytes(60),
                                "data/aotinductor/model/model.wrapper.cpp": "int main() {}"},
        "sympy expression": {"models/model.json": members["models/model.json"].decode().replace(
            f'"expr_str": "{expr}"', '"expr_str": ' + json.dumps(f"exec({run!r}) or {expr}"))},
        "parameter name": {member: members[member].decode().replace('"net.1.weight"', fqn)
                           for member in ("models/model.json", "data/weights/model_weights_config.json")},
        "forward_arg_names": {"models/model.json": program(lambda t: t["graph_module"]["module_call_graph"][0][
            "signature"].update(forward_arg_names=[f'x=0):\n    {run}\n    """ #']))},
        "kwarg name in in_spec": {"models/model.json": program(lambda t: t["graph_module"]["module_call_graph"][0][
            "signature"].update(in_spec=json.dumps(kwargs_spec)))},
        "guards_code": {"models/model.json": program(lambda t: t.update(guards_code=[f"{to_bytes} is None"]))},
    }
    paths = {name: rewrite(base, tmp / f"code-{name.replace(' ', '_')}.pt2", changes)
             for name, changes in crafted.items()}
    paths["torch 2.7 layout"] = _legacy_layout(tmp / "code-torch_2.7_layout.pt2", members, exec_pickle)
    return paths


def _legacy_layout(path: Path, members: dict[str, bytes], payload: Payload) -> Path:
    """An archive in the layout torch.export.load falls back to (torch 2.7), its constants a pickle payload."""
    from torch._export.serde.schema import SCHEMA_VERSION

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        archive.writestr("serialized_exported_program.json", members["models/model.json"])
        archive.writestr("serialized_state_dict.pt", torch_saved({}))
        archive.writestr("serialized_constants.pt", torch_saved(payload))
        archive.writestr("serialized_example_inputs.pt", torch_saved(((), {})))
    return path


def damaged_archives(tmp: Path) -> dict[str, Path]:
    """Archives that are not zips, incomplete, malformed, truncated at many offsets or with bits flipped."""
    base = export_tiny(tmp / "damaged-base.pt2")
    raw = base.read_bytes()
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        out[name] = tmp / f"damaged-{len(out)}.pt2"
        out[name].write_bytes(data)

    put("empty file", b"")
    put("text file", b"not an archive\n")
    put("random bytes", random.Random(1).randbytes(4096))
    put("a zip header and junk", b"PK\x03\x04" + random.Random(2).randbytes(2000))
    junk = io.BytesIO()
    with zipfile.ZipFile(junk, "w") as archive:
        rng = random.Random(3)
        for _ in range(5):
            archive.writestr(f"junk/{rng.randbytes(4).hex()}", rng.randbytes(200))
    put("a zip of junk", junk.getvalue())
    for member in ("archive_format", "archive_version", "models/model.json", "data/sample_inputs/model.pt",
                   "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
                   "data/weights/weight_0"):
        out[f"missing {member}"] = rewrite(base, tmp / f"damaged-{len(out)}.pt2", {member: None})
    for name, changes in {"archive_format not pt2": {"archive_format": "zip"},
                          "archive_version 9": {"archive_version": "9"},
                          "model.json not JSON": {"models/model.json": "{\"graph_module\": "},
                          "model.json deeply nested": {"models/model.json": "[" * 100_000 + "]" * 100_000},
                          "model.json of another schema": {"models/model.json": json.dumps({"graph": []})},
                          "weights config of another schema": {"data/weights/model_weights_config.json": "[]"},
                          "sample inputs not a pickle": {"data/sample_inputs/model.pt": b"\x80\x02junk"},
                          "a weight too short": {"data/weights/weight_0": bytes(8)},
                          "an empty weight of 10^12 elements": {
                              "data/weights/weight_0": b"", "data/weights/model_weights_config.json":
                              _huge_weight(read_members(base)[1]["data/weights/model_weights_config.json"])},
                          }.items():
        out[name] = rewrite(base, tmp / f"damaged-{len(out)}.pt2", changes)
    root, members = read_members(base)
    twice, bomb, stray = io.BytesIO(), io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(twice, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate it is asked to write
        for name, data in members.items():
            archive.writestr(root + name, data)
        archive.writestr(root + "models/model.json", b"{}")
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(root + name, data)
        archive.writestr(root + "extra/zeros", bytes(64 << 20))
    with zipfile.ZipFile(stray, "w") as archive:
        for name, data in members.items():
            archive.writestr(root + name, data)
        archive.writestr("other/models/model.json", members["models/model.json"])
    put("a member listed twice", twice.getvalue())
    put("a zip bomb member", bomb.getvalue())
    put("members in two folders", stray.getvalue())
    for cut in (1, 10, 100, 1000, len(raw) // 4, len(raw) // 3, len(raw) // 2, 2 * len(raw) // 3,
                3 * len(raw) // 4, len(raw) - 100, len(raw) - 22, len(raw) - 1):
        put(f"truncated at {cut} of {len(raw)} bytes", raw[:cut])
    with zipfile.ZipFile(base) as archive:  # byte ranges of the members' data, which zip CRCs protect
        spans = [(i.header_offset + 30 + len(i.filename.encode()) + _extra_length(raw, i.header_offset),
                  i.compress_size) for i in archive.infolist() if i.compress_size]
    for seed in range(12):
        rng = random.Random(seed)
        start, size = rng.choice(spans)
        data = bytearray(raw)
        data[start + rng.randrange(size)] ^= rng.randrange(1, 256)
        put(f"a byte of member data flipped (seed {seed})", bytes(data))
    return out


def _extra_length(raw: bytes, header: int) -> int:
    """The length of the extra field of the local file header at offset `header`."""
    return int.from_bytes(raw[header + 28:header + 30], "little")


def _huge_weight(config: bytes) -> str:
    """A weights config whose first weight claims 10^12 elements."""
    tree = json.loads(config)
    tree["config"]["net.1.weight"]["tensor_meta"]["sizes"] = [{"as_int": 1_000_000}, {"as_int": 1_000_000}]
    return json.dumps(tree)


#: Crafted archives that trust does not make loadable (the message does not offer --trust-checkpoint).
UNTRUSTABLE = {"torch 2.7 layout"}
#: What the CLI must say about each crafted archive.
REFUSALS = {"sympy expression": "shape expression", "parameter name": "will not turn into code",
            "forward_arg_names": "will not turn into code", "kwarg name in in_spec": "will not turn into code",
            "torch 2.7 layout": "torch 2.7 or older", "aotinductor library": "AOTInductor"}


def exported_cases(tmp: Path) -> list[HostileCase]:
    """Command lines analysing every crafted and damaged archive: each fails cleanly and runs no code."""
    marker, results = tmp / MARKER_NAME, existing_results(tmp)
    cases = []
    for name, path in code_archives(tmp, marker).items():
        if name in LOADS_SAFELY:  # the code would only run in a guard function that curvscope never builds
            args = ["analyse", path, *TINY_DATA, "-o", tmp / "guards.h5", *QUICK]
            cases.append(HostileCase(f".pt2 {name}", args, expect=0, protect=[results, path], marker=marker))
            continue
        message = words(REFUSALS.get(name, "can only be loaded by running code"))
        message += r".*--trust-\s*checkpoint" if name not in UNTRUSTABLE else ""
        cases.append(HostileCase(f".pt2 {name}", ["analyse", path, *TINY_DATA, "-o", results, *QUICK], message,
                                 protect=[results, path], marker=marker))
    for name, path in damaged_archives(tmp).items():
        message = "empty" if name == "empty file" else words("not a readable torch.export program")
        cases.append(HostileCase(f".pt2 {name}", ["analyse", path, *TINY_DATA, "-o", results, *QUICK], message,
                                 protect=[results, path]))
    return cases
