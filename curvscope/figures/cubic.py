"""The cubic-regularised steps figure (issue #18): predicted and actual loss decrease against λ_int, beside the
unregularised Newton step, and the order-3 diagonal D per group."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from curvscope.figures.heatmaps import layer_starts
from curvscope.figures.kfac import group_ticks
from curvscope.figures.points import signed_points
from curvscope.figures.titles import common_prefix, figure_title, prefix_note, strip_prefix
from curvscope.store.hdf5 import StoredCheckpoint


def has_order3(stored: StoredCheckpoint) -> bool:
    """Whether the checkpoint carries order3/ (Hessian records analysed with --order3)."""
    return "order3/diagonal" in stored.data


def cubic_figure(stored: StoredCheckpoint) -> Figure:
    """Left: predicted q₃(η) and actual decrease of the cubic-regularised step against λ_int (log scale; λ_int
    without a step marked), with Newton's predicted and actual decrease as lines. Right: D_s per group with its
    standard error (symmetric log scale)."""
    lam = stored["order3/cubic/damping_int"]
    found = stored["order3/cubic/found"].astype(bool)
    pred, act = stored["order3/cubic/predicted_decrease"], stored["order3/cubic/actual_decrease"]
    asked = stored["order3/cubic/requested"].astype(bool)
    steps = [str(n) for n in stored["interactions/steps/kind"]]
    newton = steps.index("newton")
    q_star = float(stored["interactions/steps/predicted_decrease"][newton])
    n_act = float(stored["interactions/steps/actual_decrease"][newton])
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(lam[found], pred[found], "o-", color="#2166ac", label="predicted q₃(η)")
    ax1.plot(lam[found], act[found], "s-", color="#b2182b", label="actual L(θ) − L(θ − Σ η_s U_s)")
    ax1.plot(lam[found & asked], act[found & asked], "s", ms=11, mfc="none", color="black",
             label="λ_int asked for (--damping-int)")
    ax1.axhline(q_star, color="#2166ac", ls=":", lw=1.2, label=f"Newton (unregularised): predicted {q_star:.3g}")
    ax1.axhline(n_act, color="#b2182b", ls=":", lw=1.2, label=f"Newton: actual {n_act:.3g}")
    for x in lam[~found]:
        ax1.axvline(x, color="#7f7f7f", lw=0.8, ls="--")
    if (~found).any():
        ax1.plot([], [], color="#7f7f7f", ls="--", lw=0.8, label="no step found (no root)")
    ax1.set_xscale("log")
    values = np.concatenate([pred[found], act[found], [q_star, n_act]])
    values = values[np.isfinite(values)]
    if values.size and np.abs(values).max() > 100 * max(np.median(np.abs(values)), 1e-300):
        ax1.set_yscale("symlog", linthresh=float(max(np.abs(values[values != 0]).min(), 1e-15)) if
                       (values != 0).any() else 1.0)
    ax1.axhline(0, color="black", lw=0.6)
    ax1.set_xlabel("internal damping λ_int")
    ax1.set_ylabel("loss decrease")
    ax1.set_title("cubic-regularised step: η = (H̄ + ½ λ_int ‖Dη‖ D²)⁻¹ ḡ", fontsize=10)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    d, err = stored["order3/diagonal"], stored["order3/stderr"]
    names = [str(n) for n in stored["partition/name"]]
    prefix = common_prefix(names)
    signed_points(ax2, np.asarray(d, dtype=float), np.asarray(err, dtype=float), "D_s")
    group_ticks(ax2, strip_prefix(names, prefix), layer_starts(stored["partition/layer"]))
    ax2.set_ylabel("D_s = ∂³L/∂η_s³ (± 1 standard error)")
    note = prefix_note(prefix)
    ax2.set_title("order-3 diagonal along each group's direction" + (f"\n{note}" if note else ""), fontsize=10)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(figure_title(stored, "cubic-regularised learning rates"), fontsize=10)
    return fig
