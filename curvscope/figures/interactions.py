"""Interaction figures from the stored file: distance profile, step efficiency, outlined heatmaps."""
from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator, NullLocator

from curvscope.figures.heatmaps import FEW, draw_heatmap, layer_starts
from curvscope.figures.output import MAX_INCHES
from curvscope.figures.titles import (
    MatrixNames,
    common_prefix,
    figure_title,
    labels_that_fit,
    matrix_names,
    prefix_note,
    strip_prefix,
)
from curvscope.measures.interactions import layer_index
from curvscope.store.hdf5 import StoredCheckpoint

MATRICES = ("hessian", "inverse")  # interactions/<matrix>/: C̄ itself (stored under its Hessian name) and C̄⁻¹
DEFAULT_TOLERANCE = 0.1


def step_label(name: str, names: MatrixNames) -> str:
    """A stored step's name as shown: the stored names say "hessian" for C̄ itself, whatever C is."""
    return name.replace("hessian", names.short)


def symlog_bars(ax: Axes, values: np.ndarray, linthresh: float, also: tuple[float, ...] = (),
                most_ticks: int = 14) -> None:
    """A symmetric log y scale (linear within `linthresh` of 0) whose limits hold every finite bar of `values`,
    from 0 to its end, and the levels in `also` (reference lines), with a margin; ticks at 0 and at powers of
    ten beyond `linthresh`, every k-th decade when more than `most_ticks` would crowd the axis.

    Matplotlib's own limits on this scale can end at 0 and hide every positive bar.
    """
    ax.set_yscale("symlog", linthresh=linthresh)
    finite = values[np.isfinite(values)]
    ends = np.concatenate([finite, [0.0], np.asarray(also, dtype=float)])
    scale = ax.yaxis.get_transform()
    low, high = scale.transform(np.array([ends.min(), ends.max()]))
    margin = 0.06 * (high - low) if high > low else linthresh
    bottom, top = scale.inverted().transform(np.array([low - margin, high + margin]))
    ax.set_ylim(bottom, top)
    first = int(np.ceil(np.log10(linthresh)))
    up = list(range(first, int(np.floor(np.log10(top))) + 1)) if top >= 10.0 ** first else []
    down = list(range(first, int(np.floor(np.log10(-bottom))) + 1)) if -bottom >= 10.0 ** first else []
    step = max(1, -(-(len(up) + len(down) + 1) // most_ticks))
    ax.set_yticks([-(10.0 ** d) for d in down[::step]] + [0.0] + [10.0 ** d for d in up[::step]])
    ax.yaxis.set_minor_locator(NullLocator())


def finite_bars(values: np.ndarray) -> np.ndarray:
    """`values` with every non-finite one NaN: a bar of NaN height is not drawn."""
    return np.where(np.isfinite(values), values, np.nan)


def has_interactions(stored: StoredCheckpoint) -> bool:
    """Whether the checkpoint carries interactions/."""
    return "interactions/steps/efficiency" in stored.data


def distance_figure(stored: StoredCheckpoint) -> Figure:
    """Mean and max |N(M)_st| against the distance between the layers of s and t, for C̄ and C̄⁻¹."""
    names = matrix_names(stored)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, matrix in zip(axes, MATRICES):
        mean, peak = stored[f"interactions/{matrix}/distance_mean"], stored[f"interactions/{matrix}/distance_max"]
        k = np.arange(len(mean))
        marker = 6.0 if len(k) <= 20 else 2.5  # tens or hundreds of distances: small markers
        ax.plot(k, peak, "o-", color="#b2182b", label="max", ms=marker)
        ax.plot(k, mean, "s-", color="#2166ac", label="mean", ms=marker)
        ax.set_title(f"{names.tex(matrix == 'inverse', normalized=True)}: off-diagonal |entries|", fontsize=10)
        ax.set_xlabel("layer distance k (0: weight–bias of one layer)")
        if len(k) <= 20:
            ax.set_xticks(k)
        else:  # tens or hundreds of layers: integer ticks, as many as fit
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("|N(M)_st| over pairs k layers apart")
    axes[0].legend(fontsize=8)
    fig.suptitle(figure_title(stored, "interaction against layer distance"), fontsize=10)
    return fig


def steps_figure(stored: StoredCheckpoint) -> Figure:
    """Step efficiency q(η)/q* per approximation, and predicted against actual loss decrease."""
    steps = [str(n) for n in stored["interactions/steps/name"]]
    names = matrix_names(stored)
    eff = stored["interactions/steps/efficiency"]
    pred, act = stored["interactions/steps/predicted_decrease"], stored["interactions/steps/actual_decrease"]
    x = np.arange(len(steps))
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    if np.all(np.isnan(eff)):
        ax1.text(0.5, 0.5, f"efficiency undefined:\n{names.bar} is not positive definite", ha="center",
                 va="center", transform=ax1.transAxes)
    else:
        ax1.bar(x, finite_bars(eff), color=["#4d4d4d" if n == "newton" else "#4393c3" for n in steps])
        ax1.axhline(1 - DEFAULT_TOLERANCE, color="#b2182b", ls="--", lw=1,
                    label=f"valid above 1 − {DEFAULT_TOLERANCE:g} (audit default)")
        ax1.legend(fontsize=8, loc="lower left")
        if np.nanmax(np.abs(finite_bars(eff))) > 2:  # bad approximations reach large negative efficiencies
            symlog_bars(ax1, eff, 1.0, also=(1.0,))
    ax1.set_ylabel("efficiency q(η) / q(η*)")
    ax1.set_title("step efficiency of each approximation", fontsize=10)
    w = 0.38
    ax2.bar(x - w / 2, finite_bars(pred), w, label="predicted q(η)", color="#92c5de")
    ax2.bar(x + w / 2, finite_bars(act), w, label="actual L(θ) − L(θ − Σ η_s U_s)", color="#f4a582")
    ax2.axhline(0, color="black", lw=0.6)
    both = np.abs(np.concatenate([pred, act]))
    both = both[np.isfinite(both) & (both > 0)]
    if both.size and both.max() > 100 * np.median(both):  # decreases spanning orders of magnitude
        # linear up to the smallest decrease, so that every bar reaches the logarithmic part (15 decades at most)
        symlog_bars(ax2, np.concatenate([pred, act]), float(max(both.min(), 1e-15 * both.max())))
    ax2.set_ylabel("loss decrease")
    ax2.set_title("predicted against actual loss decrease", fontsize=10)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(x, [step_label(n, names) for n in steps], rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(figure_title(stored, "per-group steps"), fontsize=10)
    return fig


def outlined_heatmap_figure(stored: StoredCheckpoint, grey_insignificant: bool = False) -> Figure:
    """N(C̄) and N(C̄⁻¹) over all S groups with the layer blocks outlined.

    With `grey_insignificant`, off-diagonal entries whose C̄ entry is within 2
    standard errors of zero are greyed out (in both panels, as C̄⁻¹ inherits them).
    """
    names = matrix_names(stored)
    groups = [str(n) for n in stored["partition/name"]]
    prefix = common_prefix(groups)
    groups = strip_prefix(groups, prefix)
    layers = stored["partition/layer"]
    idx = layer_index(layers)
    S = len(groups)
    size = max(4.0, min(0.38 * S + 2, (MAX_INCHES - 1) / 2))  # within MAX_INCHES wide
    fig = Figure(figsize=(2 * size + 1, size + (0.3 if prefix else 0)), layout="constrained")
    axes = fig.subplots(1, 2)
    mask = np.zeros((S, S), dtype=bool)
    if grey_insignificant and int(stored["interactions/significant_count"]) >= 0:
        mask = ~stored["interactions/significant"] & ~np.eye(S, dtype=bool)
    cell = 0.7 * size * 72 / max(S, 1)  # points a cell takes, the heatmap taking about 70 % of its panel
    for ax, matrix in zip(axes, MATRICES):
        n = stored[f"interactions/{matrix}/normalized"]
        vmax = float(np.nanmax(np.abs(n))) or 1.0
        draw_heatmap(ax, np.where(mask, np.nan, n), Normalize(-vmax, vmax), groups, groups,
                     gridlines=0.0 if S > FEW else 0.5, max_labels=labels_that_fit(0.7 * size, 7),
                     anchors=layer_starts(layers))
        start = 0
        for layer in range(int(idx.max()) + 1 if S else 0):
            width = int(np.sum(idx == layer))
            ax.add_patch(Rectangle((start, start), width, width, fill=False, edgecolor="black",
                                   lw=min(1.6, max(0.3, 0.3 * cell)), clip_on=False))
            start += width
        grey = f" (grey: |{names.bar}_st| ≤ 2 s.e.)" if mask.any() else ""
        ax.set_title(names.tex(matrix == "inverse", normalized=True) + grey, fontsize=10)
        ax.tick_params(labelsize=7)
    note = prefix_note(prefix)
    fig.suptitle(figure_title(stored, "layer blocks outlined") + (f"\n{note}" if note else ""), fontsize=10)
    return fig
