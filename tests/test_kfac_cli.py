"""K-FAC under audit (issue #15) end to end through the command line: analyse stores interactions/kfac beside the
GGN and the Fisher (never the Hessian), info and render show it, audit --approximation kfac judges it, and the
settings (--kfac, --kfac-samples, --kfac-approximation), older files without it and partitions without it."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_tiny_bundle
from torch import nn

from curvscope.cli.main import main

KFAC = "interactions/kfac"
ROW_KEYS = {"approximation", "of", "off_block_ratio", "efficiency", "predicted_decrease", "actual_decrease", "rule",
            "verdict", "valid", "flavour", "kfac_approximation", "lost_to_blocks", "lost_to_kronecker"}
PARTS = {"all", "weight-weight", "bias-bias", "weight-bias"}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def flat(text: str) -> str:
    """The output with its line wrapping undone (errors are wrapped at 100 columns)."""
    return " ".join(text.split())


def analyse(ckpt: Path, out: Path, *args: object) -> None:
    res = run("analyse", ckpt, "-o", out, "--no-spectrum", "--no-render", "-q", *args)
    assert res.exit_code == 0, res.output


def audit_json(*args: object) -> tuple[int, dict]:
    res = run("audit", *args, "--approximation", "kfac", "--json")
    assert res.exit_code in (0, 1, 2), res.output
    return res.exit_code, (json.loads(res.output) if res.exit_code != 2 else {})


def kfac_rows(doc: dict) -> dict[str, dict]:
    """The K-FAC row of each checkpoint that has one, by label."""
    out = {}
    for c in doc["checkpoints"]:
        rows = [r for r in c["approximations"] if r["approximation"] == "kfac"]
        assert len(rows) <= 1, c
        if rows:
            out[c["label"]] = rows[0]
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("kfac-bundle") / "t.pt")


@pytest.fixture(scope="module")
def results(bundle: Path) -> Path:
    """The tiny bundle's Hessian, GGN and Fisher, without spectra (K-FAC by default: auto)."""
    out = bundle.parent / "r.h5"
    analyse(bundle, out, "--curvature", "hessian", "--curvature", "ggn", "--curvature", "fisher")
    return out


# --- analyse, info, render -----------------------------------------------------------------------------


def test_kfac_is_stored_beside_the_ggn_and_the_fisher_only(results: Path) -> None:
    with h5py.File(results) as fh:
        assert KFAC not in fh["checkpoints/t"]  # K-FAC does not approximate the Hessian
        assert fh["checkpoints/t"].attrs["kfac_note"] == ""
        for label, flavour in (("t@ggn", "type-2"), ("t@fisher", "empirical")):
            ck = fh[f"checkpoints/{label}"]
            assert ck.attrs["kfac_note"] == ""
            k = ck[KFAC]
            assert k.attrs["flavour"] == flavour and k.attrs["approximation"] == "expand"
            assert k.attrs["mc_samples"] == 1 and k.attrs["seed"] == 0 and len(k.attrs["exact"]) == 0
            S = ck["pseudo_gradient"].shape[0]
            kbar, cbar = k["pseudo_curvature"][()], ck["pseudo_hessian"][()]
            assert kbar.shape == (S, S) and np.allclose(kbar, kbar.T)
            assert [r.decode() for r in k["rule"][()]] == ["linear"] * S  # the MLP's two nn.Linear
            assert [n.decode() for n in k["layers/name"][()]] == ["net.1", "net.3"]
            # K-FAC keeps only the layer blocks: nothing across them
            layer = [n.decode() for n in ck["partition/layer"][()]]
            across = np.array([[a != b for b in layer] for a in layer])
            assert np.all(kbar[across] == 0) and np.any(cbar[across] != 0)
            assert 0 < float(k["efficiency"][()]) <= 1 and k["deviation_ratio"].shape == (4,)


def test_info_says_kfac(results: Path) -> None:
    res = run("info", results)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "K-FAC (" in ln]
    assert len(lines) == 2, res.output
    assert any("K-FAC (type-2, expand): step efficiency" in ln and "exact layer blocks of Ḡ" in ln for ln in lines)
    assert any("K-FAC (empirical, expand): step efficiency" in ln and "exact layer blocks of F̄" in ln for ln in lines)


def test_render_draws_the_kfac_figure(results: Path, tmp_path: Path) -> None:
    res = run("render", results, "--out-dir", tmp_path, "--label", "t@ggn")
    assert res.exit_code == 0, res.output
    for ext in ("pdf", "png"):
        assert (tmp_path / f"t@ggn-kfac.{ext}").stat().st_size > 1000
        assert str(tmp_path / f"t@ggn-kfac.{ext}") in res.output


# --- audit --approximation kfac ------------------------------------------------------------------------


def test_audit_has_one_kfac_row_per_ggn_and_fisher_record(results: Path) -> None:
    code, doc = audit_json(results)
    rows = kfac_rows(doc)
    assert sorted(rows) == ["t@fisher", "t@ggn"]
    assert [c["approximations"] for c in doc["checkpoints"] if c["label"] == "t"] == [[]]
    for label, flavour in (("t@ggn", "type-2"), ("t@fisher", "empirical")):
        row = rows[label]
        assert ROW_KEYS <= set(row) and set(row["off_block_ratio"]) == PARTS, row
        assert row["flavour"] == flavour and row["kfac_approximation"] == "expand" and row["of"] == "matrix"
        assert row["verdict"] in ("valid", "not valid") and row["valid"] == (row["verdict"] == "valid")
        assert row["efficiency"] is not None  # Ḡ and F̄ are positive definite here
        assert math.isclose(row["lost_to_blocks"] + row["lost_to_kronecker"], 1 - row["efficiency"],
                            rel_tol=1e-12, abs_tol=1e-12)
        assert row["lost_to_blocks"] >= -1e-12  # the exact layer blocks lose ≥ 0 (Ḡ, F̄ positive definite)
    assert doc["valid"] == all(r["valid"] for r in rows.values())
    assert code == (0 if doc["valid"] else 1)
    # at tolerance 1 every defined efficiency (>= 0 here) passes: exit 0
    code, doc = audit_json(results, "--tolerance", "1")
    assert doc["valid"] and code == 0


def test_audit_text_has_the_decomposition(results: Path) -> None:
    res = run("audit", results, "--approximation", "kfac")
    assert res.exit_code in (0, 1), res.output
    lines = [ln for ln in res.output.splitlines() if "lost to the layer blocks" in ln]
    assert len(lines) == 2, res.output
    assert any(ln.strip().startswith("K-FAC (type-2, expand): efficiency") for ln in lines)
    assert "lost to the Kronecker factors" in lines[0]


def test_audit_of_a_hessian_only_file_names_the_curvature_to_analyse(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "h.h5"
    analyse(bundle, out)
    res = run("audit", out, "--approximation", "kfac")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "--curvature ggn" in flat(res.output)
    res = run("audit", bundle, "--approximation", "kfac")  # a checkpoint, analysed with the Hessian only
    assert res.exit_code == 2 and "--curvature ggn" in flat(res.output), res.output


# --- where K-FAC is exact ------------------------------------------------------------------------------


HEADS_PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn


    class TwoHeads(nn.Module):
        """Two independent linear heads concatenated: linear in its parameters."""

        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)


    def heads():
        return TwoHeads()
''')


def test_kfac_is_exact_for_linear_heads_under_mse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Λ = (2/D) I and J constant: G = blockdiag(A ⊗ B), so K̄ = Ḡ and K-FAC keeps all of Newton's step."""
    (tmp_path / "kfac_cli_heads.py").write_text(HEADS_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)})  # the plug-in's state_dict keys
    ckpt = tmp_path / "heads.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "heads.h5"
    analyse(ckpt, out, "--model", "kfac_cli_heads:heads", "--loss", "mse", "--data", "synthetic", "--data-kwargs",
            json.dumps({"shape": [4], "num_classes": 5, "n": 12, "seed": 2}), "--dtype", "float64",
            "--curvature", "ggn")
    with h5py.File(out) as fh:
        ck = fh["checkpoints/heads@ggn"]
        kbar, gbar = ck[f"{KFAC}/pseudo_curvature"][()], ck["pseudo_hessian"][()]
        np.testing.assert_allclose(kbar, gbar, rtol=1e-9, atol=1e-12 * np.abs(gbar).max())
        np.testing.assert_allclose(ck[f"{KFAC}/layers/error"][()], 0, atol=1e-9)
        np.testing.assert_allclose(ck[f"{KFAC}/layers/efficiency"][()], 1, atol=1e-9)
    code, doc = audit_json(out)
    row = kfac_rows(doc)["heads@ggn"]
    assert row["flavour"] == "type-2" and abs(row["efficiency"] - 1) <= 1e-9, row
    assert abs(row["lost_to_kronecker"]) <= 1e-9 and abs(row["off_block_ratio"]["all"]) <= 1e-9, row
    assert row["verdict"] == "valid" and doc["valid"] and code == 0


# --- the settings --------------------------------------------------------------------------------------


def test_kfac_off_stores_none_and_audit_says_why(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "off.h5"
    analyse(bundle, out, "--curvature", "ggn", "--kfac", "off")
    with h5py.File(out) as fh:
        assert KFAC not in fh["checkpoints/t@ggn"]
    code, doc = audit_json(out)
    row = kfac_rows(doc)["t@ggn"]
    assert row["verdict"] == "undefined" and not row["valid"] and row["efficiency"] is None, row
    assert "--kfac off" in row["rule"] and row["flavour"] is None and row["lost_to_kronecker"] is None
    assert code == 1 and not doc["valid"]
    res = run("audit", out, "--approximation", "kfac")
    assert res.exit_code == 1 and "UNDEFINED" in res.output and "lost to the layer blocks" not in res.output


def test_kfac_mc_stores_its_flavour_and_samples(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "mc.h5"
    analyse(bundle, out, "--curvature", "ggn", "--curvature", "fisher", "--kfac", "mc", "--kfac-samples", "3")
    with h5py.File(out) as fh:
        for label in ("t@ggn", "t@fisher"):
            attrs = fh[f"checkpoints/{label}/{KFAC}"].attrs
            assert attrs["flavour"] == "mc" and attrs["mc_samples"] == 3, dict(attrs)
    code, doc = audit_json(out)
    assert {r["flavour"] for r in kfac_rows(doc).values()} == {"mc"}
    assert "K-FAC (mc, expand)" in run("info", out).output


def test_kfac_reduce_is_stored_and_equals_expand_on_an_mlp(bundle: Path, results: Path, tmp_path: Path) -> None:
    """Without weight sharing (one position per sample) reduce and expand are the same factors."""
    out = tmp_path / "reduce.h5"
    analyse(bundle, out, "--curvature", "ggn", "--kfac-approximation", "reduce")
    with h5py.File(out) as fh, h5py.File(results) as ref:
        k = fh[f"checkpoints/t@ggn/{KFAC}"]
        assert k.attrs["approximation"] == "reduce"
        np.testing.assert_allclose(k["pseudo_curvature"][()], ref[f"checkpoints/t@ggn/{KFAC}/pseudo_curvature"][()],
                                   rtol=1e-10, atol=1e-14)
    code, doc = audit_json(out)
    assert kfac_rows(doc)["t@ggn"]["kfac_approximation"] == "reduce"
    # audit analyses a checkpoint first, with the K-FAC settings given to it
    code, doc = audit_json(bundle, "--curvature", "ggn", "--kfac-approximation", "reduce", "--kfac", "mc")
    row = kfac_rows(doc)["t@ggn"]
    assert (row["kfac_approximation"], row["flavour"]) == ("reduce", "mc") and code == (0 if doc["valid"] else 1)


@pytest.mark.parametrize("args", [["--kfac-samples", "0"], ["--kfac", "sometimes"],
                                  ["--kfac-approximation", "squeeze"]])
def test_bad_kfac_settings_are_one_error_paragraph(bundle: Path, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "bad.h5"
    res = run("analyse", bundle, "-o", out, "--curvature", "ggn", "--no-spectrum", "--no-render", *args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("curvscope: error:") and res.output.count("curvscope: error:") == 1, res.output
    assert "\n\n" not in res.output.strip() and "Traceback" not in res.output
    assert args[0] in flat(res.output) and not out.exists()


# --- files without K-FAC -------------------------------------------------------------------------------


def test_a_file_without_kfac_still_reads(results: Path, tmp_path: Path) -> None:
    """A GGN record as an older curvscope wrote it: no interactions/kfac, no kfac_note."""
    old = tmp_path / "old.h5"
    old.write_bytes(results.read_bytes())
    with h5py.File(old, "r+") as fh:
        for label in ("t@ggn", "t@fisher"):
            del fh[f"checkpoints/{label}/{KFAC}"]
        for label in fh["checkpoints"]:
            del fh[f"checkpoints/{label}"].attrs["kfac_note"]
    res = run("info", old)
    assert res.exit_code == 0 and "K-FAC" not in res.output, res.output
    figs = tmp_path / "figs"
    res = run("render", old, "--out-dir", figs, "--label", "t@ggn")
    assert res.exit_code == 0, res.output
    assert (figs / "t@ggn-interactions-steps.png").exists() and not (figs / "t@ggn-kfac.png").exists()
    res = run("audit", old)
    assert res.exit_code in (0, 1), res.output
    code, doc = audit_json(old)
    rows = kfac_rows(doc)
    assert sorted(rows) == ["t@fisher", "t@ggn"] and code == 1
    assert all(r["verdict"] == "undefined" and "older" in r["rule"] for r in rows.values()), rows


def test_the_trivial_partition_has_no_kfac_and_says_why(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "trivial.h5"
    analyse(bundle, out, "--partition", "trivial", "--curvature", "ggn")
    with h5py.File(out) as fh:
        ck = fh["checkpoints/t@ggn"]
        assert KFAC not in ck
        note = ck.attrs["kfac_note"]
    assert note.startswith("K-FAC not computed") and "trivial partition" in note and "spans several" in note, note
    res = run("info", out)
    assert res.exit_code == 0 and "K-FAC not computed" in res.output and "step efficiency" not in res.output, res.output
    code, doc = audit_json(out)
    row = kfac_rows(doc)["t@ggn"]
    assert row["verdict"] == "undefined" and row["rule"] == note and code == 1


def test_kfac_in_a_hessian_record_is_refused(results: Path, tmp_path: Path) -> None:
    """A tampered file whose Hessian record carries a K-FAC group: bad input for every reader, like an unknown
    curvature (see test_curvature_cli), not a K-FAC of the Hessian for info and render and none for audit."""
    odd = tmp_path / "odd.h5"
    odd.write_bytes(results.read_bytes())
    with h5py.File(odd, "r+") as fh:
        fh.copy(fh[f"checkpoints/t@ggn/{KFAC}"], fh["checkpoints/t/interactions"], name="kfac")
    for args in (["info", odd], ["render", odd, "--out-dir", tmp_path / "figs", "--label", "t"],
                 ["audit", odd, "--approximation", "kfac"]):
        res = run(*args)
        assert res.exit_code == 2 and "kfac" in res.output and "Traceback" not in res.output, (args, res.output)


def test_kfac_of_another_curvature_is_refused(results: Path, tmp_path: Path) -> None:
    """A GGN record whose K-FAC claims the empirical flavour (the Fisher's) is bad input for every reader."""
    odd = tmp_path / "odd.h5"
    odd.write_bytes(results.read_bytes())
    with h5py.File(odd, "r+") as fh:
        fh[f"checkpoints/t@ggn/{KFAC}"].attrs["flavour"] = "empirical"
    for args in (["info", odd], ["audit", odd, "--approximation", "kfac"]):
        res = run(*args)
        assert res.exit_code == 2 and "does not approximate" in " ".join(res.output.split()), (args, res.output)
