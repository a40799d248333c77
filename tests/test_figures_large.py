"""Figures of many groups (issue #16: S = 30 … 300): thinned tick labels, a capped size, the common name prefix
shown once, the layers view, and bars that stay inside their axes; built from synthetic stored checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from curvscope.figures.heatmaps import LAYERS_CMAP, heatmap_figure, layer_rms
from curvscope.figures.interactions import outlined_heatmap_figure, steps_figure, symlog_bars
from curvscope.figures.kfac import kfac_figure
from curvscope.figures.output import DPI, MAX_PIXELS, PAD, png_dpi, save_figure
from curvscope.figures.titles import MAX_LABELS, common_prefix, strip_prefix, thinned
from curvscope.measures.normalized import normalized
from curvscope.store.hdf5 import StoredCheckpoint

PREFIX = "transformer.h."
STEPS = ["newton", "cauchy", "block-diagonal hessian (tensor)", "block-diagonal inverse (tensor)",
         "block-diagonal hessian (layer)", "block-diagonal inverse (layer)"]
# a bad approximation's step reaches efficiencies of -1e13 (the S = 300 example of issue #16)
EFFICIENCY = np.array([1.0, 0.232, -1.2e3, -8.7e12, -7.1e2, -2.6e12])
PREDICTED = np.array([2.27, 0.527, -2.8e3, -2.0e13, -1.6e3, -5.8e12])
ACTUAL = np.array([-57.0, 0.35, -3.66, -6.4e5, -2.19, -2.7e5])


def synthetic(n_layers: int, seed: int = 0, steps: tuple[np.ndarray, ...] = (EFFICIENCY, PREDICTED, ACTUAL),
              ) -> StoredCheckpoint:
    """A GGN record of `n_layers` Linear layers in transformer.h (S = 2 n_layers groups), with interactions and
    K-FAC, as read back from a results file."""
    rng = np.random.default_rng(seed)
    S = 2 * n_layers
    b = rng.standard_normal((S, S + 4))
    matrix = b @ b.T / S + np.eye(S)
    layers = np.array([f"{PREFIX}{i}" for i in range(n_layers) for _ in range(2)])
    kinds = np.array(["weight", "bias"] * n_layers)
    names = np.array([f"{layer}.{kind}" for layer, kind in zip(layers, kinds)])
    inverse = np.linalg.inv(matrix)
    eff, pred, act = steps
    data = {
        "partition/name": names, "partition/kind": kinds, "partition/layer": layers,
        "pseudo_hessian": matrix, "pseudo_hessian_inverse": inverse,
        "interactions/hessian/normalized": normalized(matrix), "interactions/inverse/normalized": normalized(inverse),
        "interactions/significant_count": -1, "interactions/significant": np.ones((S, S), dtype=bool),
        "interactions/steps/name": np.array(STEPS), "interactions/steps/efficiency": eff,
        "interactions/steps/predicted_decrease": pred, "interactions/steps/actual_decrease": act,
        "interactions/steps/kind": np.array(["newton", "cauchy", "hessian", "inverse", "hessian", "inverse"]),
        "interactions/steps/grouping": np.array(["all", "all", "tensor", "tensor", "layer", "layer"]),
        "interactions/kfac/rule": np.array(["linear"] * S),
        "interactions/kfac/pseudo_curvature": matrix * rng.uniform(0.5, 2.0, size=(S, S)),
        "interactions/kfac/layers/name": np.array([f"{PREFIX}{i}" for i in range(n_layers)]),
        "interactions/kfac/layers/rule": np.array(["linear"] * n_layers),
        "interactions/kfac/layers/error": rng.uniform(0, 3, n_layers),
        "interactions/kfac/layers/efficiency": np.concatenate([rng.uniform(-0.8, 1.0, n_layers - 1), [-40.0]]),
        "interactions/kfac/efficiency": -517.0, "interactions/kfac/predicted_decrease": -1.2e3,
        "interactions/kfac/actual_decrease": -3.1,
    }
    attrs = {"curvature": "ggn", "model": "deep", "dataset": "synthetic", "split": "train", "n_samples": 32,
             "epoch": -1}
    return StoredCheckpoint(f"deep{S}", attrs, data,
                            {"interactions/kfac": {"flavour": "type-2", "approximation": "expand"}})


@pytest.fixture(scope="module")
def large() -> StoredCheckpoint:
    return synthetic(150)  # S = 300


def _heat(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_title()]


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


# --- label thinning and prefixes ----------------------------------------------------------------------------


def test_thinned_keeps_first_last_and_anchors_within_the_cap() -> None:
    assert thinned(30, 40) == list(range(30))
    anchors = list(range(0, 300, 2))  # layer starts: every other group
    for cap in (10, 40, 60):
        shown = thinned(300, cap, anchors)
        assert len(shown) <= cap and shown[0] == 0 and shown[-1] == 299
        assert min(np.diff(shown)) >= -(-300 // cap)  # evenly spread, never crowded
    shown = thinned(300, 60, anchors)
    assert set(shown[:-1]) <= set(anchors)  # every label but the forced last one starts a layer
    assert len(thinned(300, 60)) >= 45  # as many as fit, not far fewer


def test_common_prefix_is_cut_at_a_dot_and_never_swallows_a_name() -> None:
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.bias", "transformer.h.10.ln_1.weight"]
    assert common_prefix(names) == PREFIX
    assert strip_prefix(names, PREFIX) == ["0.attn.c_attn.weight", "1.mlp.c_fc.bias", "10.ln_1.weight"]
    assert common_prefix(["transformer.h.1", "transformer.h.10"]) == PREFIX  # not "transformer.h.1"
    assert common_prefix(["fc1.weight", "fc2.weight"]) == ""
    assert common_prefix(["a.b", "a.b.c"]) == "a."  # "a.b" would leave nothing of the first name
    assert common_prefix(["only.one"]) == "" and common_prefix([]) == ""


def test_large_heatmaps_thin_their_labels_and_name_the_prefix_once(large: StoredCheckpoint) -> None:
    fig = heatmap_figure(large, "normalized")
    heat = _heat(fig)
    assert len(heat) == 6
    for ax in heat:
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            labels = _labels(ticks)
            assert 10 <= len(labels) <= MAX_LABELS
            assert labels[0] == "0" and labels[-1] == "149"  # first and last layer, without the prefix
            assert not any(label.startswith("transformer") for label in labels)
    assert f"prefix '{PREFIX}'" in fig.get_suptitle()
    assert all(ax.collections[0].get_rasterized() for ax in heat)  # 150 x 150 cells: an image inside the PDF


def test_large_outlined_heatmaps_label_layer_starts(large: StoredCheckpoint) -> None:
    fig = outlined_heatmap_figure(large)
    heat = _heat(fig)
    assert len(heat[0].patches) == 150  # every layer outlined
    labels = _labels(heat[0].get_yticklabels())
    assert len(labels) <= MAX_LABELS and labels[0] == "0.weight" and labels[-1] == "149.bias"
    assert all(label.endswith(".weight") for label in labels[:-1])  # layer boundaries, where they fit
    assert f"prefix '{PREFIX}'" in fig.get_suptitle()


def test_large_kfac_figure_thins_group_and_layer_labels(large: StoredCheckpoint) -> None:
    fig = kfac_figure(large)
    for ax, first, last in ((fig.axes[0], "0.weight", "149.bias"), (fig.axes[1], "0", "149"),
                            (fig.axes[2], "0", "149")):
        labels = _labels(ax.get_xticklabels())
        assert len(labels) <= MAX_LABELS and labels[0] == first and labels[-1] == last
    _assert_bars_inside(fig.axes[2])
    _assert_bars_inside(fig.axes[3])


# --- size --------------------------------------------------------------------------------------------------


def _pixels(fig: Figure) -> float:
    """The PNG's larger side, with the tight box's padding."""
    return (float(max(fig.get_size_inches())) + 2 * PAD) * png_dpi(fig)


def test_large_figures_stay_within_4000_pixels(large: StoredCheckpoint) -> None:
    two = [large, StoredCheckpoint("later", {**large.attrs, "epoch": 2}, large.data, large.data_attrs)]
    for fig in (heatmap_figure(large, "linear"), heatmap_figure(large, "layers"), outlined_heatmap_figure(large),
                heatmap_figure(two, "normalized")):
        assert _pixels(fig) <= MAX_PIXELS
    assert png_dpi(heatmap_figure(large, "linear")) == DPI  # sized to fit: no loss of resolution


def test_save_figure_caps_the_png_and_keeps_small_ones_at_full_resolution(tmp_path: Path) -> None:
    wide = Figure(figsize=(60, 6), layout="constrained")
    wide.subplots().plot([0, 1])
    small = Figure(figsize=(4, 3), layout="constrained")
    small.subplots().plot([0, 1])
    for name, fig in (("wide", wide), ("small", small)):
        save_figure(fig, tmp_path / name, "a line")
    with Image.open(tmp_path / "wide.png") as im:
        assert max(im.size) <= MAX_PIXELS and im.size[0] > 3500
    with Image.open(tmp_path / "small.png") as im:
        assert 3.5 * DPI < im.size[0] <= (4 + 2 * PAD) * DPI  # 4 inches at full resolution
    assert (tmp_path / "wide.pdf").stat().st_size > 1000


# --- the layers view ---------------------------------------------------------------------------------------


def test_layer_rms_is_the_root_mean_square_of_each_block() -> None:
    m = np.arange(1.0, 26.0).reshape(5, 5)
    m[4, 4] = np.nan  # a group without a scale-free value: left out of its block
    layers = np.array(["a", "a", "b", "b", "b"])
    rms = layer_rms(m, layers)
    assert rms.shape == (2, 2)
    assert rms[0, 1] == pytest.approx(np.sqrt(np.mean(m[:2, 2:] ** 2)))
    assert rms[1, 1] == pytest.approx(np.sqrt(np.nanmean(m[2:, 2:] ** 2)))
    assert np.isnan(layer_rms(np.full((2, 2), np.nan), np.array(["a", "b"]))).all()


def test_layers_view_is_one_layer_by_layer_panel_per_matrix(large: StoredCheckpoint) -> None:
    fig = heatmap_figure(large, "layers")
    heat = _heat(fig)
    assert len(heat) == 2  # C̄ beside C̄⁻¹
    for ax, matrix in zip(heat, ("pseudo_hessian", "pseudo_hessian_inverse")):
        mesh = ax.collections[0]
        values = np.asarray(mesh.get_array()).reshape(150, 150)
        n = normalized(large[matrix])
        assert values[3, 7] == pytest.approx(np.sqrt(np.mean(n[6:8, 14:16] ** 2)))
        assert mesh.norm.vmin == 0 and mesh.cmap.name == LAYERS_CMAP
    assert "layers scale" in fig.get_suptitle() and "RMS of N(M)" in fig.get_suptitle()


# --- bars inside their axes --------------------------------------------------------------------------------


def _assert_bars_inside(ax) -> None:
    low, high = sorted(ax.get_ylim())
    heights = [h for p in ax.patches if isinstance(p, Rectangle) and np.isfinite(h := p.get_height())]
    assert heights
    for h in heights:  # from 0 (where the axis may start) to its end, strictly inside
        assert low <= min(h, 0.0) and max(h, 0.0) <= high and (h == 0 or low < h < high), (h, low, high)


@pytest.mark.parametrize("steps", [(EFFICIENCY, PREDICTED, ACTUAL),
                                   (EFFICIENCY, -PREDICTED, -ACTUAL),  # large positive decreases
                                   (np.array([1.0, 0.9, 0.5, 0.2, 0.7, 0.95]), np.linspace(0.1, 0.6, 6),
                                    np.linspace(0.1, 0.5, 6))])  # all moderate: linear axes
def test_steps_figure_draws_every_finite_bar_inside_the_axes(steps: tuple[np.ndarray, ...]) -> None:
    fig = steps_figure(synthetic(3, steps=steps))
    for ax in fig.axes[:2]:
        _assert_bars_inside(ax)
    positive = [p for p in fig.axes[1].patches if isinstance(p, Rectangle) and p.get_height() > 0]
    assert positive and all(fig.axes[1].get_ylim()[1] > p.get_height() for p in positive)


def test_symlog_bars_set_decade_ticks_without_crowding() -> None:
    ax = Figure().subplots()
    values = np.array([3.0, -2e40])
    ax.bar([0, 1], values)
    symlog_bars(ax, values, 1.0)
    _assert_bars_inside(ax)
    ticks = ax.get_yticks()
    assert 0.0 in ticks and len(ticks) <= 14
