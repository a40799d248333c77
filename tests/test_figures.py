"""Heatmap panels: which entries go where, scales, and files drawn from the stored data alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import SymLogNorm

from curvscope.analysis import AnalysisOptions, analyse_checkpoint
from curvscope.errors import CurvscopeError
from curvscope.figures.heatmaps import blocks, heatmap_figure
from curvscope.figures.interactions import distance_figure, outlined_heatmap_figure, steps_figure
from curvscope.figures.render import render
from curvscope.figures.spectra import blocks_figure, density_figure
from curvscope.figures.titles import trajectory_labels
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
    fig = blocks_figure(ck)
    assert [ax.get_title() for ax in fig.axes][:2] == ["top eigenvalues of each layer block",
                                                       "top eigenvalues of each tensor block"]


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
    import dataclasses
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
    import dataclasses
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
    write_records(out, [analyse_checkpoint(tiny_bundle, AnalysisOptions())])
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
