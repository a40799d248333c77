"""Hostile checkpoints, data files, plug-ins and option values for the corpus of ``test_hostile.py``.

Every generator writes its inputs into a folder and returns :class:`HostileCase` objects; the
crafted files that try to run code would create the folder's marker file (``hostile.MARKER_NAME``).
Random damage (truncations, bit flips) is drawn from fixed seeds, so the corpus is the same on
every run.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import random
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from click.testing import CliRunner
from conftest import SHIPPED, write_tiny_bundle
from hostile import MARKER_NAME, QUICK, HostileCase, existing_results, flipped

from curvscope.cli.main import main

TINY_DATA = ["--data", "synthetic", "--data-kwargs", '{"shape": [12], "num_classes": 3, "n": 40}', "--loss", "nll"]
CODE_NAMES = ("os:system", "builtins:exec", "subprocess:run", "posix:system")


class Payload:
    """Unpickling an instance runs `call(*args)`: the classic pickle attack, here creating a marker file."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Ways a pickle runs code, each of which would create `marker`."""
    return {"os.system": Payload(os.system, f"touch '{marker}'"),
            "exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            "eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()")}


def _torch_save_with(obj: Any, path: Path) -> Path:
    """A torch.save zip archive whose data.pkl is a plain pickle of `obj` (which torch.save would refuse)."""
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as zin:
        members = {info.filename: zin.read(info.filename) for info in zin.infolist()}
    data_pkl = next(name for name in members if name.endswith("data.pkl"))
    members[data_pkl] = pickle.dumps(obj, protocol=2)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zout:
        for name, content in members.items():
            zout.writestr(name, content)
    return path


def code_in_checkpoints(tmp: Path) -> list[HostileCase]:
    """Bundles whose model, data or loss names point at code, and pickles that run code when loaded."""
    marker, out = tmp / MARKER_NAME, existing_results(tmp)
    good = torch.load(write_tiny_bundle(tmp / "base.pt"), weights_only=True)
    cases = []
    for field in ("model", "data", "loss"):
        for target in CODE_NAMES:
            bundle = {**good}
            if field == "loss":
                bundle["loss"] = target
            else:
                bundle[field] = {"name": target, "kwargs": {"command": f"touch '{marker}'"} if field == "model" else
                                 {"source": f"open({str(marker)!r}, 'w').close()"}}
            path = tmp / f"names-{field}-{target.replace(':', '-')}.pt"
            torch.save(bundle, path)
            for command in ("analyse", "audit"):
                args = [command, path, "-o", out, *QUICK] if command == "analyse" else [command, path]
                cases.append(HostileCase(f"{field} name {target} ({command})", args, "never imports code",
                                         protect=[out, path], marker=marker))
    for how, payload in payloads(marker).items():
        for protocol in (2, 4, 5):
            raw = tmp / f"pickle-{how}-p{protocol}.pt"
            raw.write_bytes(pickle.dumps({"state_dict": payload}, protocol=protocol))
            cases.append(HostileCase(f"raw pickle {how} protocol {protocol}", ["analyse", raw, "--model", "mlp", "-o",
                                                                               out, *QUICK],
                                     "Python objects|--trust-checkpoint", protect=[out, raw], marker=marker))
        for where, obj in (("top", payload), ("bundle field", {**good, "training": {"x": payload}}),
                           ("state_dict", {"w": payload})):
            path = _torch_save_with(obj, tmp / f"zip-{how}-{where.replace(' ', '_')}.pt")
            for command in ("analyse", "audit"):
                args = [command, path, "-o", out, *QUICK] if command == "analyse" else [command, path]
                cases.append(HostileCase(f"torch.save archive, {how} payload at {where} ({command})", args,
                                         "Python objects|--trust-checkpoint", protect=[out, path], marker=marker))
    return cases


def damaged_bundles(tmp: Path) -> list[HostileCase]:
    """Bundles with fields of the wrong type, and a real checkpoint truncated and with bits flipped."""
    out = existing_results(tmp)
    good = torch.load(write_tiny_bundle(tmp / "base.pt"), weights_only=True)
    fields: dict[str, dict] = {
        "model is a string": {"model": "mlp"},
        "model name is a number": {"model": {"name": 3, "kwargs": {}}},
        "model kwargs a list": {"model": {"name": "mlp", "kwargs": [1, 2]}},
        "model kwargs of the wrong type": {"model": {"name": "mlp", "kwargs": {"hidden": "six"}}},
        "model kwargs make a huge model": {"model": {"name": "mlp", "kwargs": {"in_features": 10 ** 7,
                                                                                "hidden": [10 ** 7]}}},
        "model kwargs unknown": {"model": {"name": "mlp", "kwargs": {"colour": "red"}}},
        "unknown zoo model": {"model": {"name": "resnet1000", "kwargs": {}}},
        "state_dict a list": {"state_dict": [torch.zeros(2)]},
        "state_dict empty": {"state_dict": {}},
        "state_dict of strings": {"state_dict": {"net.1.weight": "w"}},
        "state_dict with NaN": {"state_dict": {k: torch.full_like(v, float("nan")) for k, v in
                                               good["state_dict"].items()}},
        "data a list": {"data": ["synthetic"]},
        "data kwargs of the wrong type": {"data": {"name": "synthetic", "kwargs": {"shape": "twelve"}}},
        "data kwargs make a huge set": {"data": {"name": "synthetic", "kwargs": {"shape": [10 ** 6], "n": 10 ** 6}}},
        "unknown data set": {"data": {"name": "imagenet22k", "kwargs": {}}},
        "loss a number": {"loss": 7},
        "unknown loss": {"loss": "hinge"},
        "epoch a string": {"epoch": "three"},
        "version 2": {"version": 2},
        "no model at all": {"model": None},
    }
    cases = []
    for name, change in fields.items():
        path = tmp / f"field-{name.replace(' ', '_')}.pt"
        torch.save({**good, **change}, path)
        cases.append(HostileCase(f"bundle: {name}", ["analyse", path, "-o", out, *QUICK], "", protect=[out, path]))
    raw = (tmp / "base.pt").read_bytes()
    rng = random.Random(13)
    for i, cut in enumerate(sorted(rng.sample(range(1, len(raw)), 16)) + [len(raw) - 1]):
        path = tmp / f"truncated-{i}.pt"
        path.write_bytes(raw[:cut])
        cases.append(HostileCase(f"checkpoint truncated at {cut} of {len(raw)} bytes",
                                 ["analyse", path, "-o", out, *QUICK], "", protect=[out, path]))
    for seed in range(16):
        path = tmp / f"flipped-{seed}.pt"
        path.write_bytes(flipped(raw, seed))
        cases.append(HostileCase(f"checkpoint with bits flipped (seed {seed})",  # may stay usable: exit 0 or 2
                                 ["analyse", path, "-o", tmp / f"flipped-{seed}.h5", *QUICK], "", expect=(0, 2),
                                 protect=[path]))
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.pt").write_text("not a checkpoint\n")
    (tmp / "folder.pt").mkdir(exist_ok=True)
    for name in ("empty.pt", "text.pt", "folder.pt", "missing.pt"):
        cases.append(HostileCase(f"checkpoint {name}", ["analyse", tmp / name, "-o", out, *QUICK], "",
                                 protect=[out]))
    return cases


def bad_options(tmp: Path) -> list[HostileCase]:
    """Option values that are NaN, infinite, out of range or of the wrong type: refused before any work."""
    out, ck = existing_results(tmp), write_tiny_bundle(tmp / "options.pt")
    analyse = {
        "--tolerance": [], "--lanczos-tol": ["nan", "inf", "-1e-5", "0", "2"],
        "--seed": ["1e20", "-1", "100000000000000000000", "nan"],
        "--batch-size": ["1e20", "0", "-4", "100000000000000000000"],
        "--samples": ["0", "-5", "100000000000000000000", "41"],
        "--top-k": ["0", "81", "100"], "--lanczos-steps": ["0", "-1"], "--slq-runs": ["0"],
        "--trace-matvecs": ["2"], "--max-memory": ["lots", "0", "nanG", "-1G", "1e30T"],
        "--model-kwargs": ["{in:", "[1, 2]", '{"hidden": NaN}', "null"],
        "--data-kwargs": ['{"shape": "twelve"}', '{"n": "many"}', '{"n": -1}', '{"num_classes": 0}',
                          '{"shape": [12], "seed": "x"}', '{"shape": [2.5]}', "3"],
        "--partition": ["diagonal"], "--dtype": ["float16"], "--device": ["tpu", "cuda:7"],
        "--split": ["validation"], "--strategy": ["fastest"],
    }
    cases = []
    for flag, values in analyse.items():
        for value in values:
            extra = ["--data", "synthetic"] if flag == "--data-kwargs" else []
            cases.append(HostileCase(f"analyse {flag} {value}", ["analyse", ck, "-o", out, "--overwrite", *extra,
                                                                 flag, value, "--no-render", "-q"], "", protect=[out]))
    cases.append(HostileCase("top-k beyond the model's 99 parameters",
                             ["analyse", ck, "-o", out, "--overwrite", "--top-k", "100", "--lanczos-steps", "100"],
                             "at most 99", protect=[out]))
    for value in ("nan", "inf", "-0.1", "1.5", "ten"):
        cases.append(HostileCase(f"audit --tolerance {value}", ["audit", out, "--tolerance", value], "--tolerance",
                                 protect=[out]))
    for value in ("nan", "inf", "0", "-1"):
        cases.append(HostileCase(f"render --density-width {value}", ["render", out, "--out-dir", tmp / "figs",
                                                                      "--density-width", value], "--density-width",
                                 protect=[out]))
    cases.append(HostileCase("render --scale unknown", ["render", out, "--scale", "cubic"], "", protect=[out]))
    cases.append(HostileCase("unknown command", ["frobnicate"], ""))
    return cases


def _plugin_module(tmp: Path) -> str:
    """A module of data plug-ins that return every wrong kind of thing, importable from `tmp`."""
    name = f"hostile_plugins_{abs(hash(str(tmp))) % 10 ** 8}"
    (tmp / f"{name}.py").write_text(
        "import torch\n"
        "def raises(split):\n    raise ValueError('no data here')\n"
        "def number(split):\n    return 42\n"
        "def empty(split):\n    return []\n"
        "def triples(split):\n    return [(torch.zeros(2, 12), torch.zeros(2), torch.zeros(2))]\n"
        "def ragged(split):\n    return [(torch.zeros(2, 12), torch.zeros(2, dtype=torch.long)),"
        " (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))]\n"
        "def strings(split):\n    return ['ab', 'cd']\n"
        "class Broken(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 3\n"
        "    def __getitem__(self, i):\n        raise KeyError(i)\n"
        "def broken(split):\n    return Broken()\n"
        "def loss_raises():\n    def f(out, y):\n        raise ArithmeticError('bad loss')\n    return f\n"
        "def loss_vector():\n    return lambda out, y: out.sum(1)\n"
        "def loss_string():\n    return lambda out, y: 'low'\n"
        "def not_callable():\n    return 3\n"
        "def model_not_module(**kwargs):\n    return 'a model'\n")
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))
    return name


def bad_plugins_and_data(tmp: Path) -> list[HostileCase]:
    """Plug-ins (named by the user, so trusted to import) that misbehave, and damaged data files."""
    out, ck, mod = existing_results(tmp), write_tiny_bundle(tmp / "plugins.pt"), _plugin_module(tmp)
    marker = tmp / MARKER_NAME
    cases = [HostileCase(f"data plug-in {fn}", ["analyse", ck, "-o", out, "--overwrite", "--data", f"{mod}:{fn}",
                                                *QUICK], "data plug-in", protect=[out])
             for fn in ("raises", "number", "empty", "triples", "ragged", "strings", "broken", "missing")]
    cases += [HostileCase(f"loss plug-in {fn}", ["analyse", ck, "-o", out, "--overwrite", "--loss", f"{mod}:{fn}",
                                                 *QUICK], "", protect=[out])
              for fn in ("loss_raises", "loss_vector", "loss_string", "not_callable")]
    cases.append(HostileCase("model plug-in returns a string", ["analyse", ck, "-o", out, "--overwrite", "--model",
                                                                f"{mod}:model_not_module", *QUICK], "nn.Module",
                             protect=[out]))
    for how, payload in payloads(marker).items():
        path = tmp / f"objects-{how}.npz"
        np.savez(path, x=np.array([payload, 1], dtype=object), y=np.zeros(2))
        cases.append(HostileCase(f"npz with a pickled {how} object", ["analyse", ck, "-o", out, "--overwrite",
                                                                      "--data", "npz", "--data-root", path, *QUICK],
                                 "Python objects", protect=[out], marker=marker))
        cifar = tmp / f"cifar-{how}"
        cifar.mkdir(exist_ok=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (cifar / name).write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2))
        cases.append(HostileCase(f"CIFAR-10 batch with a pickled {how} object",
                                 ["analyse", ck, "-o", out, "--overwrite", "--data", "cifar10", "--data-root", cifar,
                                  *QUICK], "not a CIFAR-10 batch", protect=[out], marker=marker))
    good = io.BytesIO()
    np.savez(good, x=np.zeros((8, 12), dtype=np.float32), y=np.zeros(8, dtype=np.int64))
    for cut in (10, 100, len(good.getvalue()) // 2, len(good.getvalue()) - 5):
        path = tmp / f"truncated-{cut}.npz"
        path.write_bytes(good.getvalue()[:cut])
        cases.append(HostileCase(f"npz truncated at {cut}", ["analyse", ck, "-o", out, "--overwrite", "--data", "npz",
                                                             "--data-root", path, *QUICK], "npz", protect=[out]))
    (tmp / "mnist").mkdir(exist_ok=True)
    (tmp / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (1000).to_bytes(4, "big") * 3)
    (tmp / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (1000).to_bytes(4, "big"))
    cases.append(HostileCase("MNIST idx files that claim more than they hold",
                             ["analyse", SHIPPED, "-o", out, "--overwrite", "--data", "mnist", "--data-root",
                              tmp / "mnist", *QUICK], "truncated", protect=[out]))
    return cases


def unrenderable_values(tmp: Path) -> list[HostileCase]:
    """Results files that pass the schema but hold values no analysis writes: drawing them must fail cleanly."""
    good = tmp / "spectra.h5"
    res = CliRunner().invoke(main, ["analyse", str(write_tiny_bundle(tmp / "s.pt")), "-o", str(good), "--no-render",
                                    "--top-k", "2", "--lanczos-steps", "20", "-q"])
    assert res.exit_code == 0, res.output
    changes = {"huge H̄ entries": {"pseudo_hessian": lambda v: np.where(np.eye(len(v)) > 0, 1e308, -1e308)},
               "an all-NaN density": {"spectrum/density/density": lambda v: v * np.nan,
                                      "spectrum/density/grid": lambda v: v * np.nan}}
    cases = []
    for name, edits in changes.items():
        path = tmp / f"{name.replace(' ', '_')}.h5"
        path.write_bytes(good.read_bytes())
        with h5py.File(path, "r+") as fh:
            for dataset, edit in edits.items():
                item = fh[f"checkpoints/s/{dataset}"]
                item[...] = edit(item[()])
        cases.append(HostileCase(f"render: {name}", ["render", path, "--out-dir", tmp / "figs"], "cannot be drawn",
                                 protect=[path]))
    return cases


GENERATORS = {"code in checkpoints": code_in_checkpoints, "damaged bundles": damaged_bundles,
              "bad options": bad_options, "bad plug-ins and data": bad_plugins_and_data,
              "unrenderable values": unrenderable_values}
