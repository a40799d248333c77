"""Spectrum figures from the stored file: the SLQ density, and per-block top eigenvalues and traces."""
from __future__ import annotations

import numpy as np
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
)
from curvscope.measures.density import gaussian_density
from curvscope.store.hdf5 import StoredCheckpoint


def has_spectrum(stored: StoredCheckpoint) -> bool:
    """Whether the checkpoint was analysed with spectra."""
    return "spectrum/density/grid" in stored.data


def density_figure(stored: StoredCheckpoint, width: float | None = None) -> Figure:
    """The SLQ eigenvalue density of the curvature C (H, G or F) on a log scale, with the extreme eigenvalues marked.

    With `width`, the density is redrawn from the stored nodes and weights with σ = width x span.
    """
    d = "spectrum/density/"
    attrs = stored.data_attrs.get("spectrum/density", {})
    if width is None:
        grid, dens, sigma = stored[d + "grid"], stored[d + "density"], float(attrs.get("sigma", np.nan))
    else:
        grid, dens, sigma = gaussian_density(stored[d + "nodes"], stored[d + "weights"], width=width)
    names = matrix_names(stored)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    floor = dens.max() * 1e-12
    ax.semilogy(grid, np.maximum(dens, floor), color="#1f4e79", lw=1.4,
                label=f"SLQ density ({int(attrs.get('runs', 0))} run(s) × {int(attrs.get('steps', 0))} steps, "
                      f"σ = {sigma:.3g})")
    for end, color in (("top", "#b2182b"), ("bottom", "#2166ac")):
        values = stored.data.get(f"spectrum/{end}/values")
        if values is None:
            continue
        conv = stored[f"spectrum/{end}/converged"]
        for i, (v, c) in enumerate(zip(values, conv)):
            ax.axvline(v, color=color, lw=0.8, ls="-" if c else "--", alpha=0.8,
                       label=f"{end}-{len(values)} Lanczos (dashed: not converged)" if i == 0 else None)
    ax.set_ylim(bottom=max(floor, dens.max() * 1e-8))
    ax.set_xlabel(f"eigenvalue λ of {names.matrix}")
    ax.set_ylabel("density")
    ax.set_title(figure_title(stored, names.spectrum), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def _blocks(stored: StoredCheckpoint, kind: str) -> list[str]:
    order = stored.data_attrs.get("spectrum/blocks", {}).get("order", [])
    return [g for g in np.atleast_1d(order)
            if stored.data_attrs.get(f"spectrum/blocks/{g}", {}).get("kind") == kind]


def _top(stored: StoredCheckpoint, group: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The block's stored top eigenvalues and their convergence flags; None when not computed (--block-spectra)."""
    values = stored.data.get(f"spectrum/blocks/{group}/top/values")
    if values is None:
        return None
    return np.asarray(values), np.asarray(stored[f"spectrum/blocks/{group}/top/converged"], dtype=bool)


def blocks_figure(stored: StoredCheckpoint) -> Figure:
    """Top-k eigenvalues (hollow: not converged; where computed) and traces (± 1 stderr) of every diagonal block C_BB.

    Every block has a trace; its eigenvalues may be absent (`--block-spectra layer` computes them for layers only,
    `off` for none), so a block's column may be empty above its trace, and a kind without any says so.
    """
    kinds = [k for k in ("layer", "tensor") if _blocks(stored, k)]
    c_bb = f"{matrix_names(stored).symbol}_BB"
    per_block = min(0.45, (MAX_INCHES - 4.2) / max(1, sum(len(_blocks(stored, k)) for k in kinds)))
    width = min(MAX_INCHES, 4.2 + per_block * sum(len(_blocks(stored, k)) for k in kinds))
    fig = Figure(figsize=(width, 6.4), layout="constrained")
    prefix = common_prefix([g for k in kinds for g in _blocks(stored, k)])
    axes = fig.subplots(2, len(kinds), squeeze=False)
    for c, kind in enumerate(kinds):
        groups = _blocks(stored, kind)
        x = np.arange(len(groups))
        ax = axes[0, c]
        tops = {g: t for g in groups if (t := _top(stored, g)) is not None}
        for i, g in enumerate(groups):
            if g not in tops:
                continue
            vals, conv = tops[g]
            ax.scatter(np.full(len(vals), i)[conv], vals[conv], color="#b2182b", s=22, zorder=3)
            ax.scatter(np.full(len(vals), i)[~conv], vals[~conv], facecolor="none", edgecolor="#b2182b", s=22, zorder=3)
        ax.set_title(f"top eigenvalues of each {kind} block", fontsize=10)
        if tops:
            every = np.concatenate([v for v, _ in tops.values()])
            if np.all(every > 0):
                ax.set_yscale("log")
            else:
                ax.set_yscale("symlog", linthresh=1e-3 * float(np.max(np.abs(every))) or 1.0)
            ax.set_ylabel(f"eigenvalue of {c_bb}")
        else:
            ax.text(0.5, 0.5, f"not computed\n(--block-spectra {kind} computes them)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.35")
            ax.set_yticks([])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        tr = np.array([float(stored[f"spectrum/blocks/{g}/trace"]) for g in groups])
        se = np.array([float(stored[f"spectrum/blocks/{g}/trace_stderr"]) for g in groups])
        axes[1, c].bar(x, tr, yerr=se, color="#4393c3", ecolor="black", capsize=3)
        axes[1, c].set_title(f"trace of each {kind} block (± 1 s.e.)", fontsize=10)
        axes[1, c].set_ylabel(f"tr({c_bb})")
        if np.all(tr - se > 0):
            axes[1, c].set_yscale("log")
        shown = thinned(len(groups), labels_that_fit(per_block * len(groups), 8))
        names = strip_prefix(groups, prefix)
        for ax in axes[:, c]:
            ax.set_xticks(x[shown], [names[i] for i in shown], rotation=90, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    note = prefix_note(prefix)
    fig.suptitle(figure_title(stored, "diagonal blocks") + (f"\n{note}" if note else ""), fontsize=10)
    return fig
