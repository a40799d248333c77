"""Interaction figures from the stored file: distance profile, step efficiency, outlined heatmaps."""
from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from curvscope.figures.heatmaps import draw_heatmap
from curvscope.figures.titles import MatrixNames, figure_title, matrix_names
from curvscope.measures.interactions import layer_index
from curvscope.store.hdf5 import StoredCheckpoint

MATRICES = ("hessian", "inverse")  # interactions/<matrix>/: C̄ itself (stored under its Hessian name) and C̄⁻¹
DEFAULT_TOLERANCE = 0.1


def step_label(name: str, names: MatrixNames) -> str:
    """A stored step's name as shown: the stored names say "hessian" for C̄ itself, whatever C is."""
    return name.replace("hessian", names.short)


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
        ax.plot(k, peak, "o-", color="#b2182b", label="max")
        ax.plot(k, mean, "s-", color="#2166ac", label="mean")
        ax.set_title(f"{names.tex(matrix == 'inverse', normalized=True)}: off-diagonal |entries|", fontsize=10)
        ax.set_xlabel("layer distance k (0: weight–bias of one layer)")
        ax.set_xticks(k)
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
        ax1.bar(x, np.nan_to_num(eff), color=["#4d4d4d" if n == "newton" else "#4393c3" for n in steps])
        ax1.axhline(1 - DEFAULT_TOLERANCE, color="#b2182b", ls="--", lw=1,
                    label=f"valid above 1 − {DEFAULT_TOLERANCE:g} (audit default)")
        ax1.legend(fontsize=8, loc="lower left")
        if np.nanmax(np.abs(eff)) > 2:  # bad approximations reach large negative efficiencies
            ax1.set_yscale("symlog", linthresh=1.0)
    ax1.set_ylabel("efficiency q(η) / q(η*)")
    ax1.set_title("step efficiency of each approximation", fontsize=10)
    w = 0.38
    ax2.bar(x - w / 2, pred, w, label="predicted q(η)", color="#92c5de")
    ax2.bar(x + w / 2, np.where(np.isfinite(act), act, np.nan), w, label="actual L(θ) − L(θ − Σ η_s U_s)",
            color="#f4a582")
    ax2.axhline(0, color="black", lw=0.6)
    both = np.abs(np.concatenate([pred, act]))
    both = both[np.isfinite(both) & (both > 0)]
    if both.size and both.max() > 100 * np.median(both):  # decreases spanning orders of magnitude
        ax2.set_yscale("symlog", linthresh=float(np.median(both)))
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
    layers = stored["partition/layer"]
    idx = layer_index(layers)
    S = len(groups)
    size = max(4.0, 0.38 * S + 2)
    fig = Figure(figsize=(2 * size + 1, size), layout="constrained")
    axes = fig.subplots(1, 2)
    mask = np.zeros((S, S), dtype=bool)
    if grey_insignificant and int(stored["interactions/significant_count"]) >= 0:
        mask = ~stored["interactions/significant"] & ~np.eye(S, dtype=bool)
    for ax, matrix in zip(axes, MATRICES):
        n = stored[f"interactions/{matrix}/normalized"]
        vmax = float(np.nanmax(np.abs(n))) or 1.0
        labels = None if S > 40 else groups
        draw_heatmap(ax, np.where(mask, np.nan, n), Normalize(-vmax, vmax), labels, labels)
        start = 0
        for layer in range(int(idx.max()) + 1 if S else 0):
            width = int(np.sum(idx == layer))
            ax.add_patch(Rectangle((start, start), width, width, fill=False, edgecolor="black", lw=1.6,
                                   clip_on=False))
            start += width
        grey = f" (grey: |{names.bar}_st| ≤ 2 s.e.)" if mask.any() else ""
        ax.set_title(names.tex(matrix == "inverse", normalized=True) + grey, fontsize=10)
        ax.tick_params(labelsize=7)
    fig.suptitle(figure_title(stored, "layer blocks outlined"), fontsize=10)
    return fig
