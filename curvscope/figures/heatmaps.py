"""The paper's heatmaps of C̄ and C̄⁻¹ (H̄ and H̄⁻¹ for the Hessian): weight-weight, bias-bias and weight-bias blocks.

Per checkpoint, two rows (C̄, C̄⁻¹) by three columns (WW, BB, WB); a
diverging colormap centred on zero (white ≈ 0, red > 0, blue < 0) with
symmetric limits per panel, as in Wolinski (arXiv:2312.03885). When the
partition does not split weights from biases (layer, trivial, discrete), one
panel per row shows the whole matrix. Titles name the record's curvature
(H̄, Ḡ or F̄).

Scales: ``linear``; ``symlog`` (linear within 10⁻³·max|M| of zero, logarithmic
beyond); ``normalized``, N(M)_st = M_st / sqrt(|M_ss M_tt|), computed on the
whole matrix before the blocks are cut out.

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

from curvscope.figures.titles import figure_title, matrix_names, trajectory_labels
from curvscope.measures.normalized import normalized
from curvscope.store.hdf5 import StoredCheckpoint

SCALES = ("linear", "symlog", "normalized")
SYMLOG_LINEAR_FRACTION = 1e-3
CMAP = "RdBu_r"
MAX_TICK_LABELS = 40  # beyond this many rows a panel has no tick labels


@dataclass(frozen=True)
class Panel:
    """One heatmap: a block of a matrix with its row and column labels."""

    title: str
    values: np.ndarray
    rows: list[str]
    cols: list[str]


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
        return [Panel("all groups", matrix, every, every)]
    w, b = np.flatnonzero(kinds == "weight"), np.flatnonzero(kinds == "bias")
    lw, lb = [str(layers[i]) for i in w], [str(layers[i]) for i in b]
    return [Panel("weight–weight", matrix[np.ix_(w, w)], lw, lw),
            Panel("bias–bias", matrix[np.ix_(b, b)], lb, lb),
            Panel("weight–bias", matrix[np.ix_(w, b)], lw, lb)]


def _norm(values: np.ndarray, scale: str, vmax: float | None = None) -> Normalize:
    if vmax is None:
        finite = values[np.isfinite(values)]
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    if scale == "symlog":
        return SymLogNorm(linthresh=SYMLOG_LINEAR_FRACTION * vmax, vmin=-vmax, vmax=vmax, base=10)
    return Normalize(vmin=-vmax, vmax=vmax)


def draw_heatmap(ax: Axes, values: np.ndarray, norm: Normalize, rows: list[str] | None,
                 cols: list[str] | None, gridlines: float = 0.0, fmt: str = "%.2g") -> None:
    """`values` as square cells, row 0 at the top, with a colour bar beside `ax`.

    Non-finite entries are left undrawn and show the grey face of the axes. `rows`/`cols` label the
    cell centres (None: no tick labels); `gridlines` is the width of the white lines between cells.
    """
    nrows, ncols = values.shape
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=CMAP, norm=norm, edgecolors="white",
                         linewidth=gridlines)
    ax.set_xlim(0, ncols)
    ax.set_ylim(nrows, 0)  # row 0 at the top, as a matrix is written
    ax.set_aspect("equal")
    ax.set_facecolor("#bbbbbb")  # NaN entries (no scale-free value) show grey
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks([] if cols is None else np.arange(ncols) + 0.5, [] if cols is None else cols)
    ax.set_yticks([] if rows is None else np.arange(nrows) + 0.5, [] if rows is None else rows)
    ax.tick_params(axis="x", labelrotation=90)
    ax.tick_params(axis="y", labelrotation=0)
    fig = ax.get_figure()
    assert fig is not None  # the axes belong to a figure
    bar = fig.colorbar(mesh, ax=ax, shrink=0.8, format=fmt)
    bar.outline.set_linewidth(0)


def _draw(ax: Axes, panel: Panel, scale: str, vmax: float | None = None) -> None:
    many = max(len(panel.rows), len(panel.cols)) > MAX_TICK_LABELS
    draw_heatmap(ax, panel.values, _norm(panel.values, scale, vmax), None if many else panel.rows,
                 None if many else panel.cols, gridlines=0.0 if many else 0.5,
                 fmt="%.2g" if scale == "normalized" else "%.1e")
    ax.tick_params(labelsize=8)
    colorbar = ax.collections[0].colorbar
    assert colorbar is not None  # draw_heatmap added one
    colorbar.ax.tick_params(labelsize=8)
    if panel.title == "weight–bias":
        ax.set_ylabel("weight of", fontsize=8)
        ax.set_xlabel("bias of", fontsize=8)


def _rows(stored: StoredCheckpoint, scale: str) -> list[tuple[str, list[Panel]]]:
    """(name, panels) for C̄ and for C̄⁻¹ (or C̄⁺ when the pseudo-inverse was used)."""
    groups = stored["partition/kind"], stored["partition/layer"], stored["partition/name"]
    names, norm = matrix_names(stored), scale == "normalized"
    inverse = names.tex(inverse=True, normalized=norm) + (" (pseudo-inverse)" if names.pseudo_inverse else "")
    matrices = [(names.tex(normalized=norm), stored["pseudo_hessian"]), (inverse, stored["pseudo_hessian_inverse"])]
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
    limits = {(r, c): max(float(np.nanmax(np.abs(rs[r][1][c].values))) for rs in rows)
              for r in range(2) for c in range(npanels)} if shared_scale else {}
    size = max(3.2, 0.42 * max(len(p.rows) for p in rows[0][0][1]) + 1.6)
    ncols = npanels * len(checkpoints)
    fig = Figure(figsize=(size * ncols + 0.8, 2 * size + 0.3), layout="constrained")
    axes = fig.subplots(2, ncols, squeeze=False)
    names = trajectory_labels(checkpoints)
    for k, (ck_name, ck_rows) in enumerate(zip(names, rows)):
        for r, (name, panels) in enumerate(ck_rows):
            for c, panel in enumerate(panels):
                ax = axes[r, k * npanels + c]
                _draw(ax, panel, scale, limits.get((r, c)))
                label = f"{ck_name}\n" if len(checkpoints) > 1 and r == 0 else ""
                ax.set_title(f"{label}{name}: {panel.title}", fontsize=10)
    shared = ", colour limits shared across checkpoints" if shared_scale and len(checkpoints) > 1 else ""
    what = f"{matrix_names(checkpoints[0]).pseudo} and inverse"
    head = (figure_title(checkpoints[0], what) if len(checkpoints) == 1 else
            " → ".join(names) + f": {what}, {checkpoints[0].attrs.get('model')} on "
            f"{checkpoints[0].attrs.get('dataset')}")
    fig.suptitle(f"{head} — {scale} scale{shared}", fontsize=11)
    return fig
