"""Figure layouts that use their space for data: the blocks figure draws only panels with data and its traces as
points with error bars on an honest scale; heatmap panels of unequal blocks (a ResNet's S = 62 groups) keep
square cells of one size. Built from synthetic stored checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from curvscope.figures.heatmaps import heatmap_figure
from curvscope.figures.spectra import blocks_figure
from curvscope.store.hdf5 import StoredCheckpoint

ATTRS = {"curvature": "hessian", "model": "net", "dataset": "synthetic", "split": "train", "n_samples": 32,
         "epoch": 3}
LAYERS = ["conv1", "conv2", "fc1"]
TENSORS = [f"{layer}.{kind}" for layer in LAYERS for kind in ("weight", "bias")]
EIGEN = "top eigenvalues of each {} block"
TRACE = "trace of each {} block (± 1 s.e.)"


def with_blocks(tops: str = "layer", layer_traces=(5.0, 20.0, 70.0),
                tensor_traces=(4.5, 0.4, 19.0, 0.3, 69.0, -0.2), stderr: float = 0.05) -> StoredCheckpoint:
    """A record with block traces of the 3 layers and 6 tensors, and top eigenvalues of `tops` blocks
    ("layer": layers only, the default setting; "tensor": every block; "off": none)."""
    data: dict[str, object] = {}
    data_attrs: dict[str, dict] = {"spectrum/blocks": {"order": np.array(TENSORS + LAYERS)}}
    for kind, groups, traces in (("tensor", TENSORS, tensor_traces), ("layer", LAYERS, layer_traces)):
        for g, t in zip(groups, traces):
            data_attrs[f"spectrum/blocks/{g}"] = {"kind": kind}
            data[f"spectrum/blocks/{g}/trace"] = np.float64(t)
            data[f"spectrum/blocks/{g}/trace_stderr"] = np.float64(stderr)
            if tops == "tensor" or (tops == "layer" and kind == "layer"):
                data[f"spectrum/blocks/{g}/top/values"] = np.array([abs(t) / 2, abs(t) / 4])
                data[f"spectrum/blocks/{g}/top/converged"] = np.array([True, False])
    return StoredCheckpoint("net_ep03", ATTRS, data, data_attrs)


def _points(ax) -> np.ndarray:
    """The y of every trace point in `ax`, in order of x."""
    xy = [(x, y) for line in ax.lines if line.get_marker() == "o"
          for x, y in zip(line.get_xdata(), line.get_ydata())]
    return np.array([y for _, y in sorted(xy)])


@pytest.mark.parametrize("tops, titles", [
    ("layer", [EIGEN.format("layer"), TRACE.format("layer"), TRACE.format("tensor")]),
    ("tensor", [EIGEN.format("layer"), EIGEN.format("tensor"), TRACE.format("layer"), TRACE.format("tensor")]),
    ("off", [TRACE.format("layer"), TRACE.format("tensor")])])
def test_blocks_figure_draws_only_panels_with_data(tops: str, titles: list[str]) -> None:
    fig = blocks_figure(with_blocks(tops))
    assert [ax.get_title() for ax in fig.axes] == titles
    assert not any(ax.texts for ax in fig.axes)  # no panel saying "not computed"
    assert ("not computed" in fig.get_suptitle()) == (tops != "tensor")
    eigen = [ax for ax in fig.axes if ax.get_title().startswith("top")]
    assert [sum(len(c.get_offsets()) for c in ax.collections) for ax in eigen] == [
        2 * (3 if ax.get_title() == EIGEN.format("layer") else 6) for ax in eigen]


def test_default_blocks_figure_puts_layer_eigenvalues_beside_their_traces_and_tensor_traces_below() -> None:
    fig = blocks_figure(with_blocks("layer"))
    fig.draw_without_rendering()
    eig, layer, tensor = (ax.get_position() for ax in fig.axes)
    assert eig.y0 == pytest.approx(layer.y0, abs=0.02) and eig.x1 < layer.x0  # one row
    assert tensor.y1 < min(eig.y0, layer.y0) and tensor.width > 1.5 * layer.width  # the row below, full width


def test_traces_are_points_with_error_bars_not_bars_from_a_floor() -> None:
    fig = blocks_figure(with_blocks("layer"))
    layer, tensor = fig.axes[1:]
    for ax, traces in ((layer, [5.0, 20.0, 70.0]), (tensor, [4.5, 0.4, 19.0, 0.3, 69.0, -0.2])):
        assert not [p for p in ax.patches if isinstance(p, Rectangle)]  # no bars
        np.testing.assert_allclose(_points(ax), traces)
    assert layer.get_yscale() == "log"  # positive beyond their errors, over a decade apart
    low, high = layer.get_ylim()
    assert low < 5.0 - 0.05 and 70.0 + 0.05 < high
    # a negative trace: a symmetric log scale that shows 0, the negative point below it, in its own colour
    assert tensor.get_yscale() == "symlog"
    low, high = tensor.get_ylim()
    assert low < -0.2 - 0.05 < 0.0 < 69.0 + 0.05 < high
    colours = {line.get_color() for line in tensor.lines if line.get_marker() == "o"}
    assert len(colours) == 2 and "negative trace" in [t.get_text() for t in tensor.get_legend().get_texts()]


def test_traces_of_one_order_of_magnitude_are_on_a_linear_axis_from_zero() -> None:
    fig = blocks_figure(with_blocks("off", layer_traces=(5.0, 6.0, 7.0), tensor_traces=(2.0, 3.0) * 3))
    for ax in fig.axes:
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] > 7.0 * (ax is fig.axes[0])


def resnet_like() -> StoredCheckpoint:
    """S = 62 groups as in a ResNet-18: 20 convolutions (weights only), 20 batch norms (scale and shift) and a
    linear layer: 41 weights, 21 biases."""
    groups = [("conv1", "weight"), ("bn1", "weight"), ("bn1", "bias")]
    for i in range(19):
        groups += [(f"layers.{i}.conv", "weight"), (f"layers.{i}.bn", "weight"), (f"layers.{i}.bn", "bias")]
    groups += [("fc", "weight"), ("fc", "bias")]
    layers = np.array([g for g, _ in groups])
    kinds = np.array([k for _, k in groups])
    S = len(groups)
    b = np.random.default_rng(0).standard_normal((S, S + 4))
    matrix = b @ b.T / S + np.eye(S)
    data = {"partition/name": np.array([f"{g}.{k}" for g, k in groups]), "partition/kind": kinds,
            "partition/layer": layers, "pseudo_hessian": matrix, "pseudo_hessian_inverse": np.linalg.inv(matrix)}
    return StoredCheckpoint("rn_ep01", ATTRS, data, {})


def _cells(fig: Figure) -> list[tuple[float, float, int, int]]:
    """(cell width, cell height) in inches and (rows, columns) of each heatmap panel, as drawn."""
    fig.draw_without_rendering()
    w, h = fig.get_size_inches()
    out = []
    for ax in (a for a in fig.axes if a.get_title()):
        rows, cols = np.asarray(ax.collections[0].get_coordinates()).shape[:2]
        box = ax.get_position()
        out.append((box.width * w / (cols - 1), box.height * h / (rows - 1), rows - 1, cols - 1))
    return out


def test_large_weight_bias_panels_keep_square_cells_of_one_size_and_every_label() -> None:
    stored = resnet_like()
    assert len(stored["partition/name"]) == 62
    fig = heatmap_figure(stored, "linear")
    cells = _cells(fig)
    assert [(r, c) for _, _, r, c in cells] == [(41, 41), (21, 21), (41, 21)] * 2  # WW, BB, WB
    side = cells[0][0]
    for width, height, _, _ in cells:  # square, and as large in every panel: the WB panel is not squeezed
        assert width == pytest.approx(side, rel=0.02) and height == pytest.approx(side, rel=0.02)
    heat = [ax for ax in fig.axes if ax.get_title()]
    wb = heat[2]
    assert len([t for t in wb.get_yticklabels() if t.get_text()]) == 41  # every weight named
    assert len([t for t in wb.get_xticklabels() if t.get_text()]) == 21
    assert {t.get_fontsize() for ax in heat for t in ax.get_yticklabels()} == {7}  # one label size in the figure
