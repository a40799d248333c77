"""The K-FAC figure: how far K-FAC's layer blocks are from the exact ones along U, per layer and in all."""
from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from curvscope.figures.heatmaps import layer_starts
from curvscope.figures.interactions import DEFAULT_TOLERANCE, finite_bars, symlog_bars
from curvscope.figures.titles import (
    common_prefix,
    figure_title,
    labels_that_fit,
    matrix_names,
    prefix_note,
    strip_prefix,
    thinned,
)
from curvscope.store.hdf5 import StoredCheckpoint

RULE_COLOURS = {"linear": "#2166ac", "conv2d": "#b2182b", "exact": "#7f7f7f"}
KIND_MARKERS = {"weight": "o", "bias": "s", "other": "D"}
PANEL_INCHES = 4.6  # the width of a panel's axes, for the tick labels that fit along it


def has_kfac(stored: StoredCheckpoint) -> bool:
    """Whether the checkpoint carries interactions/kfac (GGN and Fisher records)."""
    return "interactions/kfac/efficiency" in stored.data


def group_ticks(ax: Axes, labels: list[str], anchors: tuple[int, ...] = ()) -> None:
    """Every label, rotated 40°, when all fit along the axis; else those that fit upright, every k-th with the
    `anchors` (layer starts) first."""
    slanted = labels_that_fit(PANEL_INCHES, 7 / np.sin(np.radians(40)))
    if len(labels) <= slanted:
        ax.set_xticks(np.arange(len(labels)), labels, rotation=40, ha="right", fontsize=7)
        return
    x = np.asarray(thinned(len(labels), labels_that_fit(PANEL_INCHES, 7), anchors), dtype=int)
    ax.set_xticks(x, [labels[i] for i in x], rotation=90, ha="center", fontsize=7)


def _symlog_if_wide(ax: Axes, values: np.ndarray) -> None:
    """A symmetric log scale when the values reach beyond [-2, 2] (bad steps reach large negative efficiencies),
    with every bar within the axes."""
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > 2:
        symlog_bars(ax, finite, 1.0, also=(1.0,))


def kfac_figure(stored: StoredCheckpoint) -> Figure:
    """Four panels: K̄_ss / C̄_ss per group; the Kronecker error of each layer block; each layer's K-FAC step
    efficiency within its block; and the whole model's step efficiency (Newton, exact layer blocks, K-FAC)
    with predicted and actual loss decreases."""
    names = matrix_names(stored)
    bar = names.tex()
    kbar_tex = r"$\bar{K}$"
    attrs = stored.data_attrs["interactions/kfac"]
    groups = [str(n) for n in stored["partition/name"]]
    layers = [str(n) or "(root)" for n in stored["interactions/kfac/layers/name"]]
    prefix = common_prefix(groups + [n for n in layers if n != "(root)"])
    groups, layers = strip_prefix(groups, prefix), strip_prefix(layers, prefix)
    kinds = [str(k) for k in stored["partition/kind"]]
    rules = [str(r) for r in stored["interactions/kfac/rule"]]
    ratio = np.diag(stored["interactions/kfac/pseudo_curvature"]) / np.diag(stored["pseudo_hessian"])
    fig = Figure(figsize=(12, 8.2), layout="constrained")
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)

    for i, (r, k) in enumerate(zip(ratio, kinds)):
        ax1.scatter(i, r, marker=KIND_MARKERS.get(k, "D"), color=RULE_COLOURS.get(rules[i], "#7f7f7f"),
                    s=28 if len(groups) <= 40 else 12,
                    zorder=3)
    ax1.axhline(1, color="black", lw=0.8)
    positive = ratio[np.isfinite(ratio) & (ratio > 0)]
    if positive.size and (ratio[np.isfinite(ratio)] > 0).all() and positive.max() / positive.min() > 10:
        ax1.set_yscale("log")
    group_ticks(ax1, groups, layer_starts(stored["partition/layer"]))
    ax1.set_ylabel(rf"{kbar_tex}$_{{ss}}$ / {bar}$_{{ss}}$")
    ax1.set_title("curvature along each group's gradient (1: exact)", fontsize=10)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=rule) for rule, c in RULE_COLOURS.items()
               if rule in rules]
    handles += [Line2D([], [], ls="", marker=m, color="black", mfc="none", label=k) for k, m in KIND_MARKERS.items()
                if k in kinds]
    ax1.legend(handles=handles, fontsize=7, ncol=2)

    layer_rules = [str(r) for r in stored["interactions/kfac/layers/rule"]]
    colours = [RULE_COLOURS.get(r.split("+")[0], "#7f7f7f") for r in layer_rules]
    x = np.arange(len(layers))
    ax2.bar(x, finite_bars(stored["interactions/kfac/layers/error"]), color=colours)
    group_ticks(ax2, layers)
    ax2.set_ylabel(rf"‖N({bar}$_{{ll}}$ − {kbar_tex}$_{{ll}}$)‖ / ‖N({bar}$_{{ll}}$)‖")
    ax2.set_title("Kronecker error of each layer block (0: exact)", fontsize=10)

    eff = stored["interactions/kfac/layers/efficiency"]
    ax3.bar(x, finite_bars(eff), color=colours)
    ax3.axhline(1, color="black", lw=0.8)
    ax3.axhline(1 - DEFAULT_TOLERANCE, color="#b2182b", ls="--", lw=1)
    _symlog_if_wide(ax3, eff)
    group_ticks(ax3, layers)
    ax3.set_ylabel(r"$q_l(\bar{K}_{ll}^{-1}\bar{g}_l)\,/\,q_l(\bar{C}_{ll}^{-1}\bar{g}_l)$"
                   .replace("C", names.symbol))
    ax3.set_title("each layer's step within its block (undefined: not drawn)", fontsize=10)

    kinds_st, groupings = stored["interactions/steps/kind"], stored["interactions/steps/grouping"]
    pick = {"Newton": (kinds_st == "newton"), "layer blocks": (kinds_st == "hessian") & (groupings == "layer")}
    labels, effs, pred, act = [], [], [], []
    for label, sel in pick.items():
        i = int(np.flatnonzero(sel)[0])
        labels.append(label)
        effs.append(float(stored["interactions/steps/efficiency"][i]))
        pred.append(float(stored["interactions/steps/predicted_decrease"][i]))
        act.append(float(stored["interactions/steps/actual_decrease"][i]))
    labels.append(f"K-FAC ({attrs['flavour']})")
    effs.append(float(stored["interactions/kfac/efficiency"]))
    pred.append(float(stored["interactions/kfac/predicted_decrease"]))
    act.append(float(stored["interactions/kfac/actual_decrease"]))
    values = np.array(effs)
    if np.isnan(values).all():
        ax4.text(0.5, 0.5, f"efficiency undefined:\n{names.bar} is not positive definite", ha="center", va="center",
                 transform=ax4.transAxes)
    else:
        xs = np.arange(len(labels))
        ax4.bar(xs, finite_bars(values), color=["#4d4d4d", "#4393c3", "#d6604d"])
        ax4.axhline(1 - DEFAULT_TOLERANCE, color="#b2182b", ls="--", lw=1,
                    label=f"valid above 1 − {DEFAULT_TOLERANCE:g} (audit default)")
        _symlog_if_wide(ax4, values)
        ax4.set_xticks(xs, [f"{label}\ne = {v:.3g}\npredicted decrease {p:.3g}\nactual decrease {a:.3g}"
                            for label, v, p, a in zip(labels, values, pred, act)], fontsize=7)
        ax4.legend(fontsize=7, loc="lower left")
    ax4.set_ylabel("efficiency q(η) / q(η*)")
    ax4.set_title(f"whole model: Newton's step, under {names.bar}'s quadratic model", fontsize=10)
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(axis="y", alpha=0.3)
    note = prefix_note(prefix)
    fig.suptitle(figure_title(stored, f"K-FAC ({attrs['flavour']}, {attrs['approximation']}) against "
                                      f"{names.bar}'s layer blocks") + (f"\n{note}" if note else ""), fontsize=10)
    return fig
