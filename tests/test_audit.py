"""`curvscope audit`: verdicts, exit codes and the JSON structure, on models with known answers."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from curvscope import newton_step, pseudo_hessian
from curvscope.analysis import AnalysisRecord
from curvscope.cli.main import main
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import interactions
from curvscope.store.hdf5 import write_records

APPROXIMATION_KEYS = {"approximation", "of", "off_block_ratio", "efficiency", "predicted_decrease",
                      "actual_decrease", "rule", "verdict", "valid"}


class Branches(nn.Module):
    """Two independent linear layers, each fitting its own target: H is block-diagonal by layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def results_file(tmp_path: Path, model: nn.Module, label: str = "branches") -> Path:
    torch.manual_seed(0)
    x, y = torch.randn(30, 3, dtype=torch.float64) + 2, torch.randn(30, 2, dtype=torch.float64)  # E[x] ≠ 0: w-b coupled
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    loss_fn = torch.nn.functional.mse_loss
    res = pseudo_hessian(model, loss_fn, batches)
    step = newton_step(res.pseudo_hessian, res.pseudo_gradient)
    inter = interactions(res.pseudo_gradient, res.pseudo_hessian, res.pseudo_hessian_stderr, step.inverse,
                         res.kinds, res.layers, step.positive_definite)
    _, after = loss_after_steps(model, loss_fn, batches, "canonical", [s.learning_rates for s in inter.steps])
    out = tmp_path / f"{label}.h5"
    write_records(out, [AnalysisRecord(label, {"source": "test", "epoch": -1}, res, step, inter, after)])
    return out


def audit(*args: object):
    return CliRunner().invoke(main, ["audit", *[str(a) for a in args]])


def test_layer_approximation_valid_when_layers_do_not_interact(tmp_path: Path) -> None:
    out = results_file(tmp_path, Branches().double())
    res = audit(out, "--approximation", "layer")
    assert res.exit_code == 0, res.output
    assert "valid (rule: efficiency >= 0.9)" in res.output and "all valid" in res.output
    doc = json.loads(audit(out, "--approximation", "layer", "--json").output)
    for row in doc["checkpoints"][0]["approximations"]:
        assert row["efficiency"] == pytest.approx(1.0, abs=1e-12)
        assert row["off_block_ratio"]["all"] == pytest.approx(0.0, abs=1e-12)
    # tensor blocks ignore the weight-bias coupling inside each layer: not valid
    res = audit(out, "--approximation", "tensor", "--of", "hessian")
    assert res.exit_code == 1 and "NOT VALID" in res.output


def test_json_structure_is_stable(tmp_path: Path) -> None:
    out = results_file(tmp_path, Branches().double())
    res = audit(out, "--approximation", "layer", "--approximation", "tensor", "--json", "--tolerance", "0.2")
    doc = json.loads(res.output)
    assert set(doc) == {"format", "version", "tolerance", "valid", "checkpoints"}
    assert doc["format"] == "curvscope-audit" and doc["version"] == 2 and doc["tolerance"] == 0.2
    (ck,) = doc["checkpoints"]
    assert set(ck) == {"label", "results", "source", "curvature", "matrix", "positive_definite", "efficiency",
                       "significant_pairs", "pairs", "newton", "cauchy", "approximations", "valid"}
    assert ck["curvature"] == "hessian" and ck["matrix"] == "H̄"
    assert set(ck["newton"]) == {"predicted_decrease", "actual_decrease"}
    assert set(ck["cauchy"]) == {"predicted_decrease", "actual_decrease", "efficiency"}
    assert [(r["approximation"], r["of"]) for r in ck["approximations"]] == [
        ("layer", "matrix"), ("layer", "inverse"), ("tensor", "matrix"), ("tensor", "inverse")]
    for row in ck["approximations"]:
        assert set(row) == APPROXIMATION_KEYS
        assert set(row["off_block_ratio"]) == {"all", "weight-weight", "bias-bias", "weight-bias"}
    assert ck["pairs"] == 6 and ck["significant_pairs"] >= 0
    assert doc["valid"] is False and res.exit_code == 1


def test_indefinite_uses_the_off_block_ratio_rule(tmp_path: Path, tiny_bundle: Path) -> None:
    res = audit(tiny_bundle, "--json")  # a checkpoint is analysed first
    doc = json.loads(res.output)
    ck = doc["checkpoints"][0]
    assert ck["positive_definite"] is False and ck["efficiency"] == "undefined: H̄ not positive definite"
    assert all(r["efficiency"] is None and r["rule"].startswith("off-block ratio") for r in ck["approximations"])
    assert res.exit_code == 1


def test_bad_input_exits_2(tmp_path: Path) -> None:
    res = audit(tmp_path / "none.h5")
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "junk.pt").write_bytes(b"junk")
    res = audit(tmp_path / "junk.pt")
    assert res.exit_code == 2 and "not a" in res.output
    res = audit(tmp_path / "junk.pt", "--tolerance", "2")
    assert res.exit_code == 2


def test_options_the_audit_would_ignore_are_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    """Analysis options with only results files, K-FAC of the inverse alone, K-FAC options for a Hessian-only
    analysis: each would be silently ignored, so each is refused (exit 2) before any work."""
    out = results_file(tmp_path, Branches().double())
    res = audit(out, "--samples", "10", "--seed", "3")
    assert res.exit_code == 2 and "--samples, --seed only apply to checkpoints" in " ".join(res.output.split())
    res = audit(out, "--approximation", "kfac", "--of", "inverse")
    assert res.exit_code == 2 and "drop --of inverse" in " ".join(res.output.split())
    res = audit(tiny_bundle, "--kfac", "mc")
    assert res.exit_code == 2 and "--kfac does nothing without --curvature ggn or fisher" in " ".join(
        res.output.split()) and "gradient" not in res.output
    assert audit(out, "--approximation", "kfac", "--approximation", "layer", "--of", "inverse").exit_code != 2


def test_undefined_measures_give_an_undefined_verdict(tmp_path: Path) -> None:
    """A zero diagonal entry of H̄ makes N(H̄), hence every off-block ratio, undefined: the verdict says so."""
    out = results_file(tmp_path, Branches().double())
    with h5py.File(out, "r+") as fh:
        grp = fh["checkpoints/branches"]
        grp["interactions"].attrs["positive_definite"] = False
        for matrix in ("hessian", "inverse"):
            grp[f"interactions/{matrix}/off_block_ratio"][...] = np.nan
    res = audit(out, "--approximation", "layer")
    assert res.exit_code == 1, res.output
    assert "UNDEFINED (efficiency and off-block ratio undefined" in res.output
    assert "NOT VALID" not in res.output and "(2 undefined)" in res.output
    assert " undefined " in res.output.splitlines()[3]  # the ratio columns
    doc = json.loads(audit(out, "--approximation", "layer", "--json").output)
    rows = doc["checkpoints"][0]["approximations"]
    assert [r["verdict"] for r in rows] == ["undefined", "undefined"] and not any(r["valid"] for r in rows)
    assert rows[0]["off_block_ratio"]["all"] is None


def test_a_nan_pseudo_hessian_is_never_positive_definite(tmp_path: Path) -> None:
    out = results_file(tmp_path, Branches().double())
    with h5py.File(out, "r+") as fh:
        fh["checkpoints/branches/pseudo_hessian"][0, 0] = np.nan  # the stored flag still says positive definite
    doc = json.loads(audit(out, "--approximation", "layer", "--json").output)
    ck = doc["checkpoints"][0]
    assert ck["positive_definite"] is False
    assert all(r["efficiency"] is None for r in ck["approximations"])
    with pytest.raises(CurvscopeError, match="NaN or infinite"):
        newton_step(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.ones(2))
