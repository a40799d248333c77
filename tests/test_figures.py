"""Heatmap panels: which entries go where, scales, and files drawn from the stored data alone."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import SymLogNorm

from curvscope.analysis import AnalysisOptions, analyse_checkpoint
from curvscope.curvature.kinds import record_label
from curvscope.errors import CurvscopeError
from curvscope.figures.heatmaps import blocks, heatmap_figure
from curvscope.figures.interactions import distance_figure, outlined_heatmap_figure, steps_figure
from curvscope.figures.render import render
from curvscope.figures.spectra import blocks_figure, density_figure
from curvscope.figures.titles import matrix_names, trajectory_labels
from curvscope.measures.density import gaussian_density
from curvscope.store.hdf5 import read_results, write_records

KINDS = np.array(["weight", "bias", "weight", "bias"])
LAYERS = np.array(["fc1", "fc1", "fc2", "fc2"])
NAMES = np.array(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])


def test_density_redrawn_from_stored_quadrature_keeps_unit_mass(stored) -> None:
    _, ck = stored
    for width in (0.005, 0.05, 0.3):
        grid, dens, sigma = gaussian_density(ck["spectrum/density/nodes"], ck["spectrum/density/weights"], width=width)
        assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)
        assert sigma > 0
    np.testing.assert_allclose(gaussian_density(ck["spectrum/density/nodes"], ck["spectrum/density/weights"],
                                                sigma=ck.data_attrs["spectrum/density"]["sigma"],
                                                grid=ck["spectrum/density/grid"])[1], ck["spectrum/density/density"])
    fig = density_figure(ck)
    assert fig.axes[0].get_yscale() == "log"
    fig = blocks_figure(ck)  # the default settings compute the eigenvalues of layer blocks only: no empty panel
    assert [ax.get_title() for ax in fig.axes] == ["top eigenvalues of each layer block",
                                                   "trace of each layer block (± 1 s.e.)",
                                                   "trace of each tensor block (± 1 s.e.)"]
    assert "top eigenvalues of tensor blocks not computed" in fig.get_suptitle()


def test_interaction_figures(stored) -> None:
    _, ck = stored
    fig = outlined_heatmap_figure(ck, grey_insignificant=True)
    heat = [ax for ax in fig.axes if ax.get_title()]
    assert len(heat) == 2 and len(heat[0].patches) == 2  # the two layers of the tiny MLP, outlined
    fig = distance_figure(ck)
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [2, 2]  # distances 0 and 1
    fig = steps_figure(ck)
    assert len(fig.axes[1].patches) == 12  # predicted and actual for six steps


def test_trajectory_with_shared_scale(stored, tmp_path: Path, tiny_bundle: Path) -> None:
    _, ck = stored
    later = dataclasses.replace(ck, label="later", data={**ck.data, "pseudo_hessian": 3 * ck["pseudo_hessian"]})
    fig = heatmap_figure([ck, later], "linear", shared_scale=True)
    heat = [ax for ax in fig.axes if ax.get_title()]
    assert len(heat) == 12
    ww_first, ww_later = heat[0].collections[0].norm, heat[3].collections[0].norm
    assert ww_first.vmax == ww_later.vmax == pytest.approx(np.max(np.abs(later["pseudo_hessian"][::2, ::2])))
    own = heatmap_figure([ck, later], "linear", shared_scale=False)
    heat = [ax for ax in own.axes if ax.get_title()]
    assert heat[3].collections[0].norm.vmax == pytest.approx(3 * heat[0].collections[0].norm.vmax)


def test_trajectory_columns_are_named_by_epoch_when_known(stored) -> None:
    _, ck = stored
    first = dataclasses.replace(ck, label="run_ep01", attrs={**ck.attrs, "epoch": 1})
    later = dataclasses.replace(ck, label="run_ep21", attrs={**ck.attrs, "epoch": 21})
    unknown = dataclasses.replace(ck, label="final", attrs={**ck.attrs, "epoch": -1})
    assert trajectory_labels([first, later]) == ["epoch 1", "epoch 21"]
    assert trajectory_labels([first, unknown]) == ["run_ep01", "final"]  # one epoch unknown: file stems
    assert trajectory_labels([first, first]) == ["run_ep01", "run_ep01"]  # equal epochs would not tell them apart
    fig = heatmap_figure([first, later], "linear")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("epoch 1\n") and titles[3].startswith("epoch 21\n")
    assert fig._suptitle.get_text().startswith("epoch 1 → epoch 21: ")


def test_blocks_cut_weight_weight_bias_bias_weight_bias() -> None:
    m = np.arange(16.0).reshape(4, 4)
    ww, bb, wb = blocks(m, KINDS, LAYERS, NAMES)
    np.testing.assert_array_equal(ww.values, [[0, 2], [8, 10]])
    np.testing.assert_array_equal(bb.values, [[5, 7], [13, 15]])
    np.testing.assert_array_equal(wb.values, [[1, 3], [9, 11]])
    assert ww.rows == ["fc1", "fc2"] and wb.cols == ["fc1", "fc2"] and wb.title == "weight–bias"


def test_whole_matrix_when_groups_are_not_weights_and_biases() -> None:
    (panel,) = blocks(np.eye(2), np.array(["other", "other"]), np.array(["fc1", "fc2"]), np.array(["fc1", "fc2"]))
    assert panel.title == "all groups" and panel.rows == ["fc1", "fc2"]


@pytest.fixture
def stored(tmp_path: Path, tiny_bundle: Path):
    out = tmp_path / "r.h5"
    write_records(out, analyse_checkpoint(tiny_bundle, AnalysisOptions()))
    return out, read_results(out)[0]


def test_panels_are_symmetric_around_zero(stored) -> None:
    _, ck = stored
    fig = heatmap_figure(ck, "linear")
    heat = [ax for ax in fig.axes if ax.get_title()]
    assert len(heat) == 6
    for ax in heat:
        norm = ax.collections[0].norm
        assert norm.vmin == -norm.vmax > -np.inf and norm.vmax > 0
    wb = heat[2].collections[0].get_array()
    assert np.max(np.abs(wb)) == pytest.approx(heat[2].collections[0].norm.vmax)
    fig_log = heatmap_figure(ck, "symlog")
    assert isinstance([ax for ax in fig_log.axes if ax.get_title()][0].collections[0].norm, SymLogNorm)
    fig_n = heatmap_figure(ck, "normalized")
    diag = np.diag(np.asarray([ax for ax in fig_n.axes if ax.get_title()][0].collections[0].get_array()).reshape(2, 2))
    np.testing.assert_allclose(np.abs(diag), 1.0)


def test_render_writes_pdf_and_png_per_scale(stored, tmp_path: Path) -> None:
    out, _ = stored
    files = render(out, tmp_path / "figs", ["linear", "normalized"])
    names = [f"heatmaps-{s}" for s in ("linear", "normalized")] + ["spectrum-density", "spectrum-blocks"] + \
        [f"interactions-{n}" for n in ("distance", "steps", "blocks")]
    assert sorted(p.name for p in files) == sorted(f"tiny_ep03-{n}.{f}" for n in names for f in ("pdf", "png"))
    assert all(p.stat().st_size > 1000 for p in files)
    with pytest.raises(CurvscopeError, match="no checkpoint labelled nope"):
        render(out, tmp_path / "figs", ["linear"], ["nope"])
    redrawn = render(out, tmp_path / "wide", ["linear"], density_width=0.2)
    assert any(p.name == "tiny_ep03-spectrum-density.png" for p in redrawn)
    with pytest.raises(CurvscopeError, match="unknown scale"):
        render(out, tmp_path / "figs", ["log"])


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_titles_name_the_hessian_by_default(stored) -> None:
    _, ck = stored
    assert ck.attrs["curvature"] == "hessian"
    assert _titles(heatmap_figure(ck, "linear"))[0] == r"$\bar{H}$: weight–weight"
    assert _titles(heatmap_figure(ck, "normalized"))[3] == r"$N(\bar{H}^{-1})$: weight–weight"
    assert "pseudo-Hessian and inverse" in heatmap_figure(ck, "linear")._suptitle.get_text()
    density = density_figure(ck)
    assert density.axes[0].get_xlabel() == "eigenvalue λ of the Hessian H"
    assert "Hessian spectrum" in density.axes[0].get_title()
    assert blocks_figure(ck).axes[0].get_ylabel() == "eigenvalue of H_BB"
    assert [t.get_text() for t in steps_figure(ck).axes[0].get_xticklabels()][2] == "block-diagonal Hessian (tensor)"


def test_matrix_names_follow_the_stored_curvature(stored) -> None:
    _, ck = stored
    for curvature, bar, pseudo, matrix in (("", "H̄", "pseudo-Hessian", "the Hessian H"),
                                           ("ggn", "\u1e20", "pseudo-GGN", "the generalised Gauss-Newton matrix G"),
                                           ("fisher", "F̄", "pseudo-Fisher", "the empirical Fisher F")):
        names = matrix_names(dataclasses.replace(ck, attrs={**ck.attrs, "curvature": curvature}))
        assert (names.bar, names.pseudo, names.matrix) == (bar, pseudo, matrix)
    old = dataclasses.replace(ck, attrs={k: v for k, v in ck.attrs.items() if k != "curvature"})
    assert matrix_names(old).kind.name == "hessian"  # files written before curvatures were recorded
    newer = matrix_names(dataclasses.replace(ck, attrs={**ck.attrs, "curvature": "kfac"}))
    assert newer.bar == "C̄" and newer.tex(inverse=True) == r"$\bar{C}^{-1}$"
    pinv = dataclasses.replace(ck, data_attrs={**ck.data_attrs, "pseudo_hessian_inverse": {"method": "pseudo-inverse"}})
    assert matrix_names(pinv).tex(inverse=True, normalized=True) == r"$N(\bar{H}^{+})$"


def test_hessian_and_ggn_records_render_apart(tmp_path: Path, tiny_bundle: Path) -> None:
    (rec,) = analyse_checkpoint(tiny_bundle, AnalysisOptions())
    records = [dataclasses.replace(rec, label=record_label(f"run_ep0{epoch}", curvature),
                                   attrs={**rec.attrs, "epoch": epoch, "curvature": curvature})
               for epoch in (1, 2) for curvature in ("hessian", "ggn")]
    out = tmp_path / "both.h5"
    write_records(out, records)
    stored = {ck.label: ck for ck in read_results(out)}
    assert sorted(stored) == ["run_ep01", "run_ep01@ggn", "run_ep02", "run_ep02@ggn"]
    ggn = stored["run_ep01@ggn"]
    titles = _titles(heatmap_figure(ggn, "linear"))
    assert titles[0] == r"$\bar{G}$: weight–weight" and titles[3] == r"$\bar{G}^{-1}$: weight–weight"
    assert heatmap_figure(ggn, "linear")._suptitle.get_text().startswith("run_ep01@ggn: pseudo-GGN and inverse")
    assert _titles(outlined_heatmap_figure(ggn)) == [r"$N(\bar{G})$", r"$N(\bar{G}^{-1})$"]
    assert density_figure(ggn).axes[0].get_xlabel() == "eigenvalue λ of the generalised Gauss-Newton matrix G"
    assert blocks_figure(ggn).axes[2].get_ylabel() == "tr(G_BB)"
    assert not any("H" in t for t in _titles(heatmap_figure(ggn, "normalized")))
    with pytest.raises(ValueError, match="different curvatures"):
        heatmap_figure([stored["run_ep01"], ggn], "linear")

    files = render(out, tmp_path / "figs", ["linear"])
    names = {p.name for p in files}
    assert {"trajectory-heatmaps-linear.pdf", "trajectory-ggn-heatmaps-linear.pdf",
            "run_ep01-heatmaps-linear.png", "run_ep01@ggn-heatmaps-linear.png",
            "run_ep02@ggn-spectrum-density.pdf"} <= names
    assert len(names) == len(files)  # nothing written twice
    from PIL import Image

    def description(name: str) -> str:
        with Image.open(tmp_path / "figs" / name) as im:
            return im.text["Description"]

    assert description("trajectory-ggn-heatmaps-linear.png").startswith(
        "heatmaps of the pseudo-GGN \u1e20 and its inverse across checkpoints run_ep01@ggn, run_ep02@ggn of both.h5")
    assert description("trajectory-heatmaps-linear.png").startswith(
        "heatmaps of the pseudo-Hessian H̄ and its inverse across checkpoints run_ep01, run_ep02 of both.h5")
    assert description("run_ep02@ggn-spectrum-blocks.png").startswith(
        "top eigenvalues and traces of the diagonal blocks of the generalised Gauss-Newton matrix G;")
    pdf = (tmp_path / "figs" / "run_ep01@ggn-heatmaps-linear.pdf").read_bytes()
    assert "pseudo-GGN \u1e20".encode("utf-16-be") in pdf  # the PDF's Subject, in UTF-16


def test_figure_modules_select_no_backend_and_import_neither_pyplot_nor_torch(tmp_path: Path) -> None:
    code = """
import sys
import matplotlib
matplotlib.use("svg")  # the program's own choice, which importing and saving figures must keep
import curvscope.figures.heatmaps, curvscope.figures.interactions, curvscope.figures.spectra
import curvscope.figures.output, curvscope.figures.render, curvscope.figures.titles
from pathlib import Path
from matplotlib.figure import Figure
fig = Figure()
fig.subplots().plot([0, 1])
curvscope.figures.output.save_figure(fig, Path(sys.argv[1]) / "f", "a line")
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print(sorted(m for m in ("matplotlib.pyplot", "seaborn", "torch") if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pdf", "f.png"]
