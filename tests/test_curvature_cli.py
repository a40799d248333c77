"""Every curvature end to end through the command line: analyse, info, render, audit, and what they import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT, write_tiny_bundle

from curvscope.cli.main import main

LABELS = {"hessian": "t", "ggn": "t@ggn", "fisher": "t@fisher"}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results file holding the Hessian, the GGN and the Fisher of one checkpoint, with spectra."""
    tmp = tmp_path_factory.mktemp("curvatures")
    out = tmp / "r.h5"
    res = run("analyse", write_tiny_bundle(tmp / "t.pt"), "-o", out, "--curvature", "hessian", "--curvature", "ggn",
              "--curvature", "fisher", "--top-k", "3", "--lanczos-steps", "40", "--no-render")
    assert res.exit_code == 0, res.output
    for label in LABELS.values():
        assert f"{label}: loss" in res.output
    assert "Ḡ positive definite" in res.output or "Ḡ indefinite" in res.output
    assert "GGN-vector products" in res.output and "Fisher-vector products" in res.output
    return out


def test_each_curvature_is_stored_under_its_label(results: Path) -> None:
    with h5py.File(results) as fh:
        assert sorted(fh["checkpoints"]) == sorted(LABELS.values())
        for curvature, label in LABELS.items():
            grp = fh[f"checkpoints/{label}"]
            assert grp.attrs["curvature"] == curvature
            # the same direction u for all three: the same pseudo-gradient
            np.testing.assert_array_equal(grp["pseudo_gradient"][()], fh["checkpoints/t/pseudo_gradient"][()])
        for label in ("t@ggn", "t@fisher"):  # G and F are positive semi-definite, so are Ḡ and the spectra's ends
            grp = fh[f"checkpoints/{label}"]
            cbar = grp["pseudo_hessian"][()]
            assert np.linalg.eigvalsh(cbar).min() >= -1e-10 * np.abs(cbar).max()
            assert grp["spectrum/bottom/values"][()].min() >= -1e-6 * grp["spectrum/top/values"][()].max()


def test_info_names_each_curvature(results: Path) -> None:
    res = run("info", results)
    assert res.exit_code == 0, res.output
    for line in ("hessian curvature", "ggn curvature", "fisher curvature"):
        assert line in res.output


def test_audit_names_the_matrix(results: Path) -> None:
    res = run("audit", results, "--json")
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.output)
    assert [(c["label"], c["curvature"], c["matrix"]) for c in doc["checkpoints"]] == [
        ("t", "hessian", "H̄"), ("t@fisher", "fisher", "F̄"), ("t@ggn", "ggn", "Ḡ")]
    text = run("audit", results).output
    assert "[t@ggn] Ḡ (generalised Gauss-Newton matrix)" in text and "Ḡ⁻¹" in text
    assert "[t@fisher] F̄ (empirical Fisher)" in text


def test_render_draws_every_curvature(results: Path, tmp_path: Path) -> None:
    res = run("render", results, "--out-dir", tmp_path)
    assert res.exit_code == 0, res.output
    for label in LABELS.values():
        for name in ("heatmaps-linear", "interactions-steps", "spectrum-density", "spectrum-blocks"):
            assert (tmp_path / f"{label}-{name}.png").stat().st_size > 1000


def test_rerun_skips_stored_curvatures_and_audits_checkpoints_per_curvature(tmp_path: Path) -> None:
    ck = write_tiny_bundle(tmp_path / "t.pt")
    out = tmp_path / "r.h5"
    assert run("analyse", ck, "-o", out, "--curvature", "ggn", "--no-spectrum", "--no-render").exit_code == 0
    res = run("analyse", ck, "-o", out, "--curvature", "ggn", "--curvature", "fisher", "--no-spectrum",
              "--no-render")
    assert res.exit_code == 0 and "t@ggn: already in" in res.output and "t@fisher: loss" in res.output
    res = run("audit", ck, "--curvature", "fisher", "--json")  # a checkpoint is analysed first
    assert [c["matrix"] for c in json.loads(res.output)["checkpoints"]] == ["F̄"]
    res = run("analyse", ck, "-o", out, "--curvature", "ggn", "--curvature", "ggn")
    assert res.exit_code == 2 and "each curvature once" in res.output
    res = run("analyse", ck, "-o", out, "--curvature", "ggn", "--strategy", "batched", "--overwrite")
    assert res.exit_code == 2 and "--strategy batched is for the Hessian" in res.output


def test_commands_that_read_results_import_no_torch(results: Path, tmp_path: Path) -> None:
    """info, render and audit of a results file work where `import torch` fails."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch must not be imported here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    for args in (["info", results], ["render", results, "--out-dir", tmp_path / "figs"], ["audit", results]):
        proc = subprocess.run([sys.executable, "-m", "curvscope", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path)
        assert proc.returncode in (0, 1), (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr


def test_an_unknown_curvature_is_refused_by_the_reader(results: Path, tmp_path: Path) -> None:
    """A record naming a curvature this curvscope does not know (tampered, or from a newer one) is bad input."""
    odd = tmp_path / "odd.h5"
    odd.write_bytes(results.read_bytes())
    with h5py.File(odd, "r+") as fh:
        fh["checkpoints/t@ggn"].attrs["curvature"] = "hessian2"
    before = odd.read_bytes()
    for command in ("info", "audit", "render"):
        res = run(command, odd)
        assert res.exit_code == 2 and "curvature" in res.output and "Traceback" not in res.output, res.output
    assert odd.read_bytes() == before
