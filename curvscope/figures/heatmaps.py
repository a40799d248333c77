"""The paper's heatmaps of C̄ and C̄⁻¹ (H̄ and H̄⁻¹ for the Hessian): weight-weight, bias-bias and weight-bias blocks.

Per checkpoint, two rows (C̄, C̄⁻¹) by three columns (WW, BB, WB); a
diverging colormap centred on zero (white ≈ 0, red > 0, blue < 0) with
symmetric limits per panel, as in Wolinski (arXiv:2312.03885). When the
partition does not split weights from biases (layer, trivial, discrete), one
panel per row shows the whole matrix. Titles name the record's curvature
(H̄, Ḡ or F̄).

Scales: ``linear``; ``symlog`` (linear within 10⁻³·max|M| of zero, logarithmic
beyond); ``normalized``, N(M)_st = M_st / sqrt(|M_ss M_tt|), computed on the
whole matrix before the blocks are cut out; ``layers``, one L x L panel per
matrix: the root mean square of N(M) over the block of each pair of layers,
‖N(M)_ll'‖_F / sqrt(n_l n_l') (n_l: the groups of layer l), from 0 (white) up.

Every panel of a figure draws its cells square and of one size, each panel as
wide as its columns: a weight-bias block with more weights than biases (a
ResNet's batch-norm scales count as weights) is as tall as the weight-weight
block and as wide as the bias-bias block, not squeezed into a square slot.
With many groups (S = 30 … 300) the figure stays within MAX_INCHES (its PNG
within 4000 pixels), tick labels are thinned to what fits (every k-th, layer
boundaries first) and the name prefix all labels share is named once in the title.

Figures are built as :class:`matplotlib.figure.Figure` objects, without pyplot:
importing this module neither selects a backend nor touches pyplot's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, SymLogNorm
from matplotlib.figure import Figure

from curvscope.figures.output import MAX_INCHES
from curvscope.figures.titles import (
    common_prefix,
    figure_title,
    labels_that_fit,
    matrix_names,
    prefix_note,
    strip_prefix,
    thinned,
    trajectory_labels,
)
from curvscope.measures.interactions import layer_index
from curvscope.measures.normalized import normalized
from curvscope.store.hdf5 import StoredCheckpoint

SCALES = ("linear", "symlog", "normalized", "layers")
SYMLOG_LINEAR_FRACTION = 1e-3
CMAP = "RdBu_r"
LAYERS_CMAP = "Reds"  # the layers scale is ≥ 0
LAYERS_DEFINITION = (r"layers: RMS of N(M) over each pair of layers' block, "
                     r"$\Vert N(M)_{ll^{\prime}}\Vert_F\,/\,\sqrt{n_l\, n_{l^{\prime}}}$")
FEW = 40  # up to this many rows a panel has every label and white lines between the cells
RASTERIZE_CELLS = 10_000  # larger meshes (over 100 x 100) go into the PDF as an image at its DPI, the rest as vectors
CELL_INCHES = 0.42  # a cell's side, at most
PANEL_WIDTH = 1.9  # inches a panel takes beside its cells: row labels, colour bar and margins
PANEL_HEIGHT = 1.3  # inches a panel takes above and below its cells: title and column labels
SMALLEST_PANEL = 3.2  # inches: a panel of few cells has larger cells rather than a smaller panel


@dataclass(frozen=True)
class Panel:
    """One heatmap: a block of a matrix with its row and column labels."""

    title: str
    values: np.ndarray
    rows: list[str]
    cols: list[str]
    anchors: tuple[int, ...] = ()  # rows (and columns) that start a layer: labelled first when labels are thinned

    def without(self, prefix: str) -> "Panel":
        """The panel with `prefix` stripped from its labels."""
        return Panel(self.title, self.values, strip_prefix(self.rows, prefix), strip_prefix(self.cols, prefix),
                     self.anchors)


def splits_weight_bias(kinds: np.ndarray, layers: np.ndarray) -> bool:
    """True when every group is one layer's weight or bias, each layer at most once per kind."""
    return (set(kinds) == {"weight", "bias"} and all(layers)
            and all(len(set(layers[kinds == k])) == int(np.sum(kinds == k)) for k in ("weight", "bias")))


def blocks(matrix: np.ndarray, kinds: np.ndarray, layers: np.ndarray, names: np.ndarray) -> list[Panel]:
    """The weight-weight, bias-bias and weight-bias blocks of `matrix`, labelled by layer.

    When the groups are not one weight or bias per layer, the whole matrix, labelled by group name.
    """
    if not splits_weight_bias(kinds, layers):
        every = [str(n) for n in names]
        return [Panel("all groups", matrix, every, every, layer_starts(layers))]
    w, b = np.flatnonzero(kinds == "weight"), np.flatnonzero(kinds == "bias")
    lw, lb = [str(layers[i]) for i in w], [str(layers[i]) for i in b]
    return [Panel("weight–weight", matrix[np.ix_(w, w)], lw, lw),
            Panel("bias–bias", matrix[np.ix_(b, b)], lb, lb),
            Panel("weight–bias", matrix[np.ix_(w, b)], lw, lb)]


def layer_starts(layers: np.ndarray) -> tuple[int, ...]:
    """The groups that start a layer (the first of each run of one layer)."""
    idx = layer_index(np.asarray(layers))
    return tuple(int(i) for i in np.flatnonzero(np.diff(idx, prepend=-1) != 0))


def layer_names(layers: np.ndarray) -> list[str]:
    """The name of each layer, in order of first appearance ("(root)" for parameters of the model itself)."""
    idx = layer_index(np.asarray(layers))
    first = [int(np.flatnonzero(idx == k)[0]) for k in range(int(idx.max()) + 1 if idx.size else 0)]
    return [str(layers[i]) or "(root)" for i in first]


def layer_rms(matrix: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """(L, L): the root mean square of `matrix` over the block of each pair of layers.

    Of N(M), ‖N(M)_ll'‖_F / sqrt(n_l n_l') for the n_l groups of layer l and n_l' of l'; non-finite entries
    (groups without a scale-free value) are left out of their block's mean, and a block of nothing else is NaN.
    """
    idx = layer_index(np.asarray(layers))
    L = int(idx.max()) + 1 if idx.size else 0
    member = (idx[:, None] == np.arange(L)[None, :]).astype(float)  # (S, L)
    finite = np.isfinite(matrix)
    squares = np.where(finite, matrix, 0.0) ** 2
    sums, counts = member.T @ squares @ member, member.T @ finite.astype(float) @ member
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.sqrt(sums / np.maximum(counts, 1)), np.nan)


def _norm(values: np.ndarray, scale: str, vmax: float | None = None) -> Normalize:
    if vmax is None:
        finite = values[np.isfinite(values)]
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    if scale == "layers":
        return Normalize(vmin=0.0, vmax=vmax)
    if scale == "symlog":
        return SymLogNorm(linthresh=SYMLOG_LINEAR_FRACTION * vmax, vmin=-vmax, vmax=vmax, base=10)
    return Normalize(vmin=-vmax, vmax=vmax)


def draw_heatmap(ax: Axes, values: np.ndarray, norm: Normalize, rows: list[str] | None,
                 cols: list[str] | None, gridlines: float = 0.0, fmt: str = "%.2g", *,
                 max_labels: int | None = None, anchors: Sequence[int] = (), cmap: str = CMAP,
                 max_col_labels: int | None = None, bar_shrink: float = 0.8) -> None:
    """`values` as square cells, row 0 at the top, with a colour bar beside `ax`.

    Non-finite entries are left undrawn and show the grey face of the axes. `rows`/`cols` label the
    cell centres (None: no tick labels), at most `max_labels` rows and `max_col_labels` (default: `max_labels`)
    columns (every k-th, the `anchors` first: see :func:`~curvscope.figures.titles.thinned`); `gridlines` is the
    width of the white lines between cells; the colour bar is `bar_shrink` times as tall as the axes' slot.
    """
    nrows, ncols = values.shape
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap, norm=norm, edgecolors="white",
                         linewidth=gridlines, rasterized=values.size > RASTERIZE_CELLS)
    ax.set_xlim(0, ncols)
    ax.set_ylim(nrows, 0)  # row 0 at the top, as a matrix is written
    ax.set_aspect("equal")
    ax.set_facecolor("#bbbbbb")  # NaN entries (no scale-free value) show grey
    for spine in ax.spines.values():
        spine.set_visible(False)
    col_cap = max_labels if max_col_labels is None else max_col_labels
    for labels, n, cap, set_ticks in ((cols, ncols, col_cap, ax.set_xticks), (rows, nrows, max_labels, ax.set_yticks)):
        shown = [] if labels is None else thinned(n, cap or n, anchors)
        set_ticks(np.asarray(shown) + 0.5, [labels[i] for i in shown] if labels is not None else [])
    ax.tick_params(axis="x", labelrotation=90)
    ax.tick_params(axis="y", labelrotation=0)
    fig = ax.get_figure()
    assert fig is not None  # the axes belong to a figure
    bar = fig.colorbar(mesh, ax=ax, shrink=bar_shrink, format=fmt)
    bar.outline.set_linewidth(0)


def _draw(ax: Axes, panel: Panel, scale: str, vmax: float | None = None, cell: float | None = None,
          height: int | None = None, many: bool | None = None) -> None:
    """`panel` in `ax`, its tick labels thinned to those that fit along cells of `cell` inches; in a row of panels
    `height` cells tall, a shorter panel's colour bar as short as its cells. `many` (default: the panel has over FEW
    rows or columns) draws smaller labels and no lines between cells, as every panel of a figure should."""
    many = max(len(panel.rows), len(panel.cols)) > FEW if many is None else many
    size = 7 if many else 8
    fit = (None, None) if cell is None else (labels_that_fit(cell * len(panel.rows), 7),
                                             labels_that_fit(cell * len(panel.cols), 7))
    draw_heatmap(ax, panel.values, _norm(panel.values, scale, vmax), panel.rows, panel.cols,
                 gridlines=0.0 if many else 0.5, fmt="%.2g" if scale in ("normalized", "layers") else "%.1e",
                 max_labels=fit[0], max_col_labels=fit[1], anchors=panel.anchors,
                 cmap=LAYERS_CMAP if scale == "layers" else CMAP,
                 bar_shrink=0.8 * min(1.0, len(panel.rows) / height) if height else 0.8)
    ax.tick_params(labelsize=size)
    colorbar = ax.collections[0].colorbar
    assert colorbar is not None  # draw_heatmap added one
    colorbar.ax.tick_params(labelsize=8)
    if panel.title == "weight–bias":
        ax.set_ylabel("weight of", fontsize=8)
        ax.set_xlabel("bias of", fontsize=8)


def _rows(stored: StoredCheckpoint, scale: str) -> list[tuple[str, list[Panel]]]:
    """(name, panels) for C̄ and for C̄⁻¹ (or C̄⁺ when the pseudo-inverse was used)."""
    groups = stored["partition/kind"], stored["partition/layer"], stored["partition/name"]
    names, norm = matrix_names(stored), scale in ("normalized", "layers")
    inverse = names.tex(inverse=True, normalized=norm) + (" (pseudo-inverse)" if names.pseudo_inverse else "")
    matrices = [(names.tex(normalized=norm), stored["pseudo_hessian"]), (inverse, stored["pseudo_hessian_inverse"])]
    if scale == "layers":
        layers = groups[1]
        return [(name, [Panel("layer blocks", layer_rms(normalized(m), layers), layer_names(layers),
                              layer_names(layers))]) for name, m in matrices]
    return [(name, blocks(normalized(m) if norm else m, *groups)) for name, m in matrices]


def heatmap_figure(stored: StoredCheckpoint | Sequence[StoredCheckpoint], scale: str = "linear",
                   shared_scale: bool = False) -> Figure:
    """Heatmaps of C̄ (top row) and C̄⁻¹ (bottom row): WW, BB, WB panels per checkpoint, side by side.

    One checkpoint gives the paper's 2 x 3 figure; several give a trajectory
    like its Figure 1, with one column group per checkpoint. Colour limits are
    symmetric per panel, or, with `shared_scale`, shared by the same panel of
    every checkpoint so that epochs can be compared.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    checkpoints = [stored] if isinstance(stored, StoredCheckpoint) else list(stored)
    if len({matrix_names(ck).kind.name for ck in checkpoints}) > 1:
        raise ValueError("the checkpoints were analysed with different curvatures and cannot share one figure")
    rows = [_rows(ck, scale) for ck in checkpoints]
    if len({len(r[0][1]) for r in rows}) != 1:
        raise ValueError("the checkpoints have different partitions and cannot share one figure")
    npanels = len(rows[0][0][1])
    prefix = common_prefix([label for rs in rows for _, panels in rs for p in panels for label in p.rows + p.cols])
    rows = [[(name, [p.without(prefix) for p in panels]) for name, panels in rs] for rs in rows]
    limits = {(r, c): max(float(np.nanmax(np.abs(rs[r][1][c].values))) for rs in rows)
              for r in range(2) for c in range(npanels)} if shared_scale else {}
    ncols = npanels * len(checkpoints)
    nrows = 2
    widths = [len(p.cols) for _ in checkpoints for p in rows[0][0][1]]  # each column of panels, in cells
    if ncols == 1:  # one panel per matrix (layers scale, or a partition that does not split weights from biases)
        nrows, ncols, widths = 1, 2, widths * 2  # C̄ beside C̄⁻¹
    height = max(len(p.rows) for p in rows[0][0][1])  # the tallest panel, in cells
    many = max(height, *widths) > FEW  # every panel with the same label size and cell lines
    # one cell size for every panel, so that cells are square and each panel is as wide as its columns:
    # CELL_INCHES at most, within MAX_INCHES (its PNG within MAX_PIXELS), the largest panel SMALLEST_PANEL at least
    fits = min((MAX_INCHES - 0.8 - PANEL_WIDTH * ncols) / sum(widths),
               (MAX_INCHES - 0.6 - PANEL_HEIGHT * nrows) / (nrows * height))
    want = max(CELL_INCHES, (SMALLEST_PANEL - 1.6) / max(max(widths), height))
    cell = max(min(want, fits), 0.01)  # (many checkpoints side by side may not fit: their PNG has a lower DPI)
    fig = Figure(figsize=(cell * sum(widths) + PANEL_WIDTH * ncols + 0.8,
                          nrows * (cell * height + PANEL_HEIGHT) + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={"width_ratios": widths})
    names = trajectory_labels(checkpoints)
    for k, (ck_name, ck_rows) in enumerate(zip(names, rows)):
        for r, (name, panels) in enumerate(ck_rows):
            for c, panel in enumerate(panels):
                ax = axes[0, r] if nrows == 1 else axes[r, k * npanels + c]
                _draw(ax, panel, scale, limits.get((r, c)), cell, height, many)
                label = f"{ck_name}\n" if len(checkpoints) > 1 and r == 0 else ""
                ax.set_title(f"{label}{name}: {panel.title}", fontsize=10)
    shared = ", colour limits shared across checkpoints" if shared_scale and len(checkpoints) > 1 else ""
    what = f"{matrix_names(checkpoints[0]).pseudo} and inverse"
    head = (figure_title(checkpoints[0], what) if len(checkpoints) == 1 else
            " → ".join(names) + f": {what}, {checkpoints[0].attrs.get('model')} on "
            f"{checkpoints[0].attrs.get('dataset')}")
    notes = [n for n in (LAYERS_DEFINITION if scale == "layers" else "", prefix_note(prefix)) if n]
    fig.suptitle(f"{head} — {scale} scale{shared}" + "".join(f"\n{n}" for n in notes), fontsize=11)
    return fig
