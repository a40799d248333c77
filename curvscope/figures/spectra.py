"""Spectrum figures from the stored file: the SLQ density, and per-block top eigenvalues and traces."""
from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from curvscope.figures.output import MAX_INCHES
from curvscope.figures.points import signed_points
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


EIGEN_COLOUR = "#b2182b"
PANEL_INCHES = 2.1  # a panel's y label, ticks and margins
BLOCK_INCHES = 0.45  # a block's column, at most


def _draw_tops(ax: Axes, stored: StoredCheckpoint, groups: list[str]) -> None:
    """The top eigenvalues of each of `groups` (hollow: not converged; a column left empty where not stored)."""
    tops = {g: t for g in groups if (t := _top(stored, g)) is not None}
    for i, g in enumerate(groups):
        if g not in tops:
            continue
        vals, conv = tops[g]
        ax.scatter(np.full(len(vals), i)[conv], vals[conv], color=EIGEN_COLOUR, s=22, zorder=3)
        ax.scatter(np.full(len(vals), i)[~conv], vals[~conv], facecolor="none", edgecolor=EIGEN_COLOUR, s=22,
                   zorder=3)
    every = np.concatenate([v for v, _ in tops.values()])
    every = every[np.isfinite(every)]
    if every.size and np.all(every > 0):
        ax.set_yscale("log")
    elif every.size:
        ax.set_yscale("symlog", linthresh=1e-3 * float(np.max(np.abs(every))) or 1.0)
        ax.axhline(0, color="black", lw=0.6, zorder=1)


def blocks_figure(stored: StoredCheckpoint) -> Figure:
    """Top-k eigenvalues (hollow: not converged) and traces (± 1 stderr) of every diagonal block C_BB.

    Every block has a trace; its eigenvalues may be absent (`--block-spectra layer`, the default, computes them for
    layers only, `off` for none). Only panels with data are drawn: with eigenvalues of every kind, eigenvalues above
    traces, a column per kind (layer, tensor); with those of layers only, layers' eigenvalues beside their traces
    and the tensors' traces below; with none, the traces side by side. The title says what was not computed.
    Traces are points with error bars (a block's trace may be negative: C is indefinite), on a log, symmetric log
    or linear scale (:func:`~curvscope.figures.points.signed_points`), never bars from an arbitrary floor.
    """
    kinds = [k for k in ("layer", "tensor") if _blocks(stored, k)]
    groups = {k: _blocks(stored, k) for k in kinds}
    with_tops = [k for k in kinds if any(_top(stored, g) is not None for g in groups[k])]
    c_bb = f"{matrix_names(stored).symbol}_BB"
    # the rows of panels (kind, eigenvalues or traces), each panel as wide as its blocks, the rows stacked
    if with_tops == kinds:
        rows = [[(k, "top") for k in kinds], [(k, "trace") for k in kinds]]
    elif not with_tops:
        rows = [[(k, "trace") for k in kinds]]
    else:
        rows = [[(k, "top"), (k, "trace")] if k in with_tops else [(k, "trace")] for k in kinds]
    blocks_in = [sum(len(groups[k]) for k, _ in row) for row in rows]
    panels_in = [len(row) for row in rows]
    widest = max(range(len(rows)), key=lambda r: PANEL_INCHES * panels_in[r] + BLOCK_INCHES * blocks_in[r])
    per_block = min(BLOCK_INCHES, (MAX_INCHES - PANEL_INCHES * panels_in[widest]) / max(1, blocks_in[widest]))
    width = max(6.4, min(MAX_INCHES, PANEL_INCHES * panels_in[widest] + per_block * blocks_in[widest]))
    fig = Figure(figsize=(width, 1.0 + 2.7 * len(rows)), layout="constrained")
    prefix = common_prefix([g for k in kinds for g in groups[k]])
    if with_tops == kinds:  # a column per kind, as wide as its blocks: eigenvalues above traces
        grid = fig.add_gridspec(2, len(kinds), width_ratios=[len(groups[k]) for k in kinds])
        spots = {(k, what): grid[r, c] for r, what in enumerate(("top", "trace")) for c, k in enumerate(kinds)}
    else:  # a row per kind (or one row of traces), its panels side by side
        ratios = [len(groups[k]) for k, _ in rows[0]] if len(rows) == 1 else [1] * max(panels_in)
        grid = fig.add_gridspec(len(rows), len(ratios), width_ratios=ratios)
        spots = {panel: (grid[r, c] if len(row) == len(ratios) else grid[r, :]) for r, row in enumerate(rows)
                 for c, panel in enumerate(row)}
    axes: dict[tuple[str, str], Axes] = {}
    for what in ("top", "trace"):  # the eigenvalue panels first in fig.axes, then the traces
        for k in kinds:
            if (k, what) in spots:
                axes[k, what] = fig.add_subplot(spots[k, what])
    for (kind, what), ax in axes.items():
        names = strip_prefix(groups[kind], prefix)
        x = np.arange(len(names))
        if what == "top":
            _draw_tops(ax, stored, groups[kind])
            ax.set_title(f"top eigenvalues of each {kind} block", fontsize=10)
            ax.set_ylabel(f"eigenvalue of {c_bb}")
        else:
            tr = np.array([float(stored[f"spectrum/blocks/{g}/trace"]) for g in groups[kind]])
            se = np.array([float(stored[f"spectrum/blocks/{g}/trace_stderr"]) for g in groups[kind]])
            signed_points(ax, tr, se, "trace")
            ax.set_title(f"trace of each {kind} block (± 1 s.e.)", fontsize=10)
            ax.set_ylabel(f"tr({c_bb})")
        ax.set_xlim(-0.6, len(names) - 0.4)
        shown = thinned(len(names), labels_that_fit(per_block * len(names), 8))
        below = what == "top" and (kind, "trace") in axes and with_tops == kinds  # the traces below name them
        ax.set_xticks(x[shown], [] if below else [names[i] for i in shown], rotation=90, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    missing = [k for k in kinds if k not in with_tops]
    notes = [prefix_note(prefix)]
    if missing:
        notes.insert(0, f"top eigenvalues of {missing[0]} blocks not computed (--block-spectra tensor computes them)"
                     if with_tops else "top eigenvalues not computed (--block-spectra layer or tensor computes them)")
    fig.suptitle(figure_title(stored, "diagonal blocks") + "".join(f"\n{n}" for n in notes if n), fontsize=10)
    return fig
