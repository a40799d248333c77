"""The K-FAC figure: how far K-FAC's layer blocks are from the exact ones along U, per layer and in all."""
from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from curvscope.figures.interactions import DEFAULT_TOLERANCE
from curvscope.figures.titles import figure_title, matrix_names
from curvscope.store.hdf5 import StoredCheckpoint

RULE_COLOURS = {"linear": "#2166ac", "conv2d": "#b2182b", "exact": "#7f7f7f"}
KIND_MARKERS = {"weight": "o", "bias": "s", "other": "D"}
MAX_TICKS = 40  # tick labels per axis; more groups or layers are labelled every k-th


def has_kfac(stored: StoredCheckpoint) -> bool:
    """Whether the checkpoint carries interactions/kfac (GGN and Fisher records)."""
    return "interactions/kfac/efficiency" in stored.data


def _ticks(ax: Axes, labels: list[str]) -> None:
    """Every label up to MAX_TICKS, else every k-th, so that long lists stay readable."""
    step = max(1, int(np.ceil(len(labels) / MAX_TICKS)))
    x = np.arange(0, len(labels), step)
    ax.set_xticks(x, [labels[i] for i in x], rotation=40, ha="right", fontsize=7)


def _symlog_if_wide(ax: Axes, values: np.ndarray) -> None:
    """A symmetric log scale when the values reach beyond [-2, 2] (bad steps reach large negative efficiencies)."""
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > 2:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(min(1.6 * finite.min(), -0.5), max(1.6 * finite.max(), 1.6))  # bars end inside the axes


def kfac_figure(stored: StoredCheckpoint) -> Figure:
    """Four panels: K̄_ss / C̄_ss per group; the Kronecker error of each layer block; each layer's K-FAC step
    efficiency within its block; and the whole model's step efficiency (Newton, exact layer blocks, K-FAC)
    with predicted and actual loss decreases."""
    names = matrix_names(stored)
    bar = names.tex()
    kbar_tex = r"$\bar{K}$"
    attrs = stored.data_attrs["interactions/kfac"]
    groups = [str(n) for n in stored["partition/name"]]
    kinds = [str(k) for k in stored["partition/kind"]]
    rules = [str(r) for r in stored["interactions/kfac/rule"]]
    ratio = np.diag(stored["interactions/kfac/pseudo_curvature"]) / np.diag(stored["pseudo_hessian"])
    fig = Figure(figsize=(12, 8.2), layout="constrained")
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)

    for i, (r, k) in enumerate(zip(ratio, kinds)):
        ax1.scatter(i, r, marker=KIND_MARKERS.get(k, "D"), color=RULE_COLOURS.get(rules[i], "#7f7f7f"), s=28,
                    zorder=3)
    ax1.axhline(1, color="black", lw=0.8)
    positive = ratio[np.isfinite(ratio) & (ratio > 0)]
    if positive.size and (ratio[np.isfinite(ratio)] > 0).all() and positive.max() / positive.min() > 10:
        ax1.set_yscale("log")
    _ticks(ax1, groups)
    ax1.set_ylabel(rf"{kbar_tex}$_{{ss}}$ / {bar}$_{{ss}}$")
    ax1.set_title("curvature along each group's gradient (1: exact)", fontsize=10)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=rule) for rule, c in RULE_COLOURS.items()
               if rule in rules]
    handles += [Line2D([], [], ls="", marker=m, color="black", mfc="none", label=k) for k, m in KIND_MARKERS.items()
                if k in kinds]
    ax1.legend(handles=handles, fontsize=7, ncol=2)

    layers = [str(n) or "(root)" for n in stored["interactions/kfac/layers/name"]]
    layer_rules = [str(r) for r in stored["interactions/kfac/layers/rule"]]
    colours = [RULE_COLOURS.get(r.split("+")[0], "#7f7f7f") for r in layer_rules]
    x = np.arange(len(layers))
    ax2.bar(x, np.nan_to_num(stored["interactions/kfac/layers/error"]), color=colours)
    _ticks(ax2, layers)
    ax2.set_ylabel(rf"‖N({bar}$_{{ll}}$ − {kbar_tex}$_{{ll}}$)‖ / ‖N({bar}$_{{ll}}$)‖")
    ax2.set_title("Kronecker error of each layer block (0: exact)", fontsize=10)

    eff = stored["interactions/kfac/layers/efficiency"]
    ax3.bar(x, np.nan_to_num(eff), color=colours)
    ax3.axhline(1, color="black", lw=0.8)
    ax3.axhline(1 - DEFAULT_TOLERANCE, color="#b2182b", ls="--", lw=1)
    _symlog_if_wide(ax3, eff)
    _ticks(ax3, layers)
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
        ax4.bar(xs, np.nan_to_num(values), color=["#4d4d4d", "#4393c3", "#d6604d"])
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
    fig.suptitle(figure_title(stored, f"K-FAC ({attrs['flavour']}, {attrs['approximation']}) against "
                                      f"{names.bar}'s layer blocks"), fontsize=10)
    return fig
