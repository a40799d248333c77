"""Checkpoint bundles: round trip and every way a checkpoint file can be bad."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHIPPED, TINY_DATA, TINY_MODEL, write_tiny_bundle

from curvscope import load_checkpoint
from curvscope.errors import CurvscopeError
from curvscope.sources.zoo import build_model


def test_bundle_round_trip(tiny_bundle: Path) -> None:
    ck = load_checkpoint(tiny_bundle)
    assert ck.model_name == "mlp" and ck.model_kwargs == TINY_MODEL and ck.data == TINY_DATA
    assert ck.loss == "nll" and ck.epoch == 3 and len(ck.sha256) == 64 and not ck.model.training
    raw = torch.load(tiny_bundle, weights_only=True)
    for name, value in ck.model.state_dict().items():
        torch.testing.assert_close(value, raw["state_dict"][name], rtol=0, atol=0)


def test_shipped_checkpoint_is_a_bundle() -> None:
    ck = load_checkpoint(SHIPPED)
    assert ck.model_name == "lenet5" and ck.model_kwargs == {"in_channels": 1}
    assert ck.data["name"] == "digits" and ck.epoch == 21 and ck.training["test_accuracy"] > 0.9


def test_plain_state_dict_needs_a_model_name(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(build_model("mlp", TINY_MODEL).state_dict(), path)
    with pytest.raises(CurvscopeError, match="--model"):
        load_checkpoint(path)
    ck = load_checkpoint(path, model="mlp", model_kwargs=TINY_MODEL)
    assert ck.model_name == "mlp" and ck.epoch == -1


def _bad(tmp_path: Path, kind: str, tiny: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(tiny.read_bytes()[:200])
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "pickled-module":
        torch.save(build_model("mlp", TINY_MODEL), path)
    elif kind == "foreign-pickle":
        path.write_bytes(pickle.dumps({"run": os.system}, protocol=2))
    elif kind == "foreign-pickle-4":
        path.write_bytes(pickle.dumps({"run": os.system}, protocol=4))
    elif kind == "list":
        torch.save([1, 2, 3], path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("empty", "empty"), ("truncated", "not a readable"), ("random", "not a"),
    ("pickled-module", "refuses"), ("foreign-pickle", "refuses"), ("foreign-pickle-4", "refuses"),
    ("list", "not a curvscope"),
])
def test_bad_files_are_refused_clearly(tmp_path: Path, tiny_bundle: Path, kind: str, message: str) -> None:
    with pytest.raises(CurvscopeError, match=message):
        load_checkpoint(_bad(tmp_path, kind, tiny_bundle))


def test_random_bytes_never_escape_as_another_exception(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    for seed in range(30):
        rng = random.Random(seed)
        path.write_bytes((b"\x80\x02" if seed % 2 else b"") + rng.randbytes(rng.randint(1, 5000)))
        with pytest.raises(CurvscopeError):
            load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CurvscopeError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_unknown_model_and_mismatched_weights(tiny_bundle: Path) -> None:
    with pytest.raises(CurvscopeError, match="unknown model 'resnet9'"):
        load_checkpoint(tiny_bundle, model="resnet9")
    with pytest.raises(CurvscopeError, match=r"net\.1\.weight .*wrong shape|wrong shape"):
        load_checkpoint(tiny_bundle, model_kwargs={**TINY_MODEL, "hidden": [7]})


def test_non_finite_weights(tmp_path: Path) -> None:
    path = write_tiny_bundle(tmp_path / "nan.pt")
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["net.1.bias"][0] = float("nan")
    torch.save(raw, path)
    with pytest.raises(CurvscopeError, match="NaN or infinite values in net.1.bias"):
        load_checkpoint(path)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_state_dict", "model", "module-prefix", "model-prefix"])
def test_common_wrappers_and_prefixes(tmp_path: Path, wrap: str) -> None:
    net = build_model("mlp", TINY_MODEL)
    state = net.state_dict()
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 7},
           "model_state_dict": {"model_state_dict": state, "optimizer": {}, "epoch": 7}, "model": {"model": state},
           "module-prefix": {f"module.{k}": v for k, v in state.items()},
           "model-prefix": {"state_dict": {f"model.{k}": v for k, v in state.items()}}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    ck = load_checkpoint(tmp_path / "w.pt", model="mlp", model_kwargs=TINY_MODEL)
    for name, value in ck.model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert ck.epoch == (7 if wrap in ("state_dict", "model_state_dict") else -1)


def test_plugin_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny(width=3):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n"
        "def not_a_model():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_model("my_models:tiny", {"width": 4})
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    ck = load_checkpoint(tmp_path / "sd.pt", model="my_models:tiny", model_kwargs={"width": 4})
    assert ck.model_name == "my_models:tiny"
    for spec, message in (("my_models:broken", "raised RuntimeError: no GPU here"),
                          ("my_models:not_a_model", "returned a int"), ("my_models:nope", "cannot import"),
                          ("no_such_package.x:f", "cannot import")):
        with pytest.raises(CurvscopeError, match=message):
            build_model(spec, {})


def test_pickled_module_only_with_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    net = build_model("mlp", TINY_MODEL)
    torch.save(net, path)
    with pytest.raises(CurvscopeError, match="--trust-checkpoint"):
        load_checkpoint(path)
    ck = load_checkpoint(path, trust=True, loss="nll")
    assert ck.model_name == "MLP" and isinstance(ck.model, torch.nn.Module) and ck.loss == "nll"


def test_torch_export_program(tmp_path: Path) -> None:
    from curvscope import pseudo_hessian
    net = build_model("mlp", TINY_MODEL)
    program = torch.export.export(net, (torch.randn(4, 12),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "m.pt2")
    ck = load_checkpoint(tmp_path / "m.pt2", loss="nll", data=TINY_DATA)
    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    exported = pseudo_hessian(ck.model, ck.loss_fn, [(x, y)])
    direct = pseudo_hessian(net, ck.loss_fn, [(x, y)])
    assert [n.removeprefix("exported.") for n in exported.names] == list(direct.names)
    np.testing.assert_allclose(exported.pseudo_hessian, direct.pseudo_hessian, rtol=1e-5, atol=1e-12)
    (tmp_path / "bad.pt2").write_bytes(b"junk")
    with pytest.raises(CurvscopeError, match="not a readable torch.export program"):
        load_checkpoint(tmp_path / "bad.pt2")
