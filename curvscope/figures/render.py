"""Every figure of a results file, drawn from the stored data alone."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

from curvscope.errors import CurvscopeError
from curvscope.figures.heatmaps import SCALES, heatmap_figure
from curvscope.figures.interactions import (distance_figure, has_interactions, outlined_heatmap_figure,
                                            steps_figure)
from curvscope.figures.output import save_figure
from curvscope.figures.spectra import blocks_figure, density_figure, has_spectrum
from curvscope.store.hdf5 import read_results


def default_figure_dir(results: Path) -> Path:
    """Where the figures of `results` go by default: a folder beside it named after it."""
    return results.with_suffix("")


def render(results: Path, out_dir: Path | None = None, scales: Sequence[str] = ("linear",),
           labels: Sequence[str] | None = None, density_width: float | None = None,
           grey_insignificant: bool = False, shared_scale: bool = False) -> list[Path]:
    """Draw the figures of every (or each named) checkpoint of `results` as PDF and PNG in `out_dir`.

    ``<label>-heatmaps-<scale>`` per scale; ``<label>-interactions-{distance,steps,blocks}``
    (the last with entries within 2 standard errors greyed when `grey_insignificant`); with spectra, ``<label>-spectrum-density``
    (redrawn with σ = `density_width` x span when given) and ``<label>-spectrum-blocks``. With
    several checkpoints of one model, also ``trajectory-heatmaps-<scale>``: all of them side by
    side, with colour limits shared across checkpoints when `shared_scale`.
    """
    for scale in scales:
        if scale not in SCALES:
            raise CurvscopeError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}.")
    stored = read_results(results)
    if labels:
        missing = sorted(set(labels) - {s.label for s in stored})
        if missing:
            raise CurvscopeError(f"{str(results)!r} holds no checkpoint labelled {', '.join(missing)}; "
                                 f"it holds {', '.join(s.label for s in stored) or 'none'}.")
        stored = [s for s in stored if s.label in labels]
    if not stored:
        raise CurvscopeError(f"{str(results)!r} holds no checkpoints to render.")
    out_dir = out_dir or default_figure_dir(results)
    written: list[Path] = []
    if len(stored) > 1 and len({tuple(ck["partition/name"]) for ck in stored}) == 1:
        for scale in scales:
            fig = heatmap_figure(stored, scale, shared_scale)
            try:
                written += save_figure(fig, out_dir / f"trajectory-heatmaps-{scale}",
                                       f"heatmaps of the pseudo-Hessian and its inverse across checkpoints "
                                       f"{', '.join(ck.label for ck in stored)} of {results.name}, {scale} scale")
            finally:
                plt.close(fig)
    for ck in stored:
        origin = (f"checkpoint {ck.label!r} of {results.name} (source {ck.attrs.get('source')}, "
                  f"sha256 {ck.attrs.get('sha256')})")
        figures = [(f"heatmaps-{scale}", lambda s=scale: heatmap_figure(ck, s),
                    f"heatmaps of the pseudo-Hessian and its inverse, {scale} scale") for scale in scales]
        if has_interactions(ck):
            figures += [("interactions-distance", lambda: distance_figure(ck),
                         "interaction between layers against their distance"),
                        ("interactions-steps", lambda: steps_figure(ck),
                         "step efficiency and predicted against actual loss decrease"),
                        ("interactions-blocks", lambda: outlined_heatmap_figure(ck, grey_insignificant),
                         "normalised pseudo-Hessian and inverse with the layer blocks outlined")]
        if has_spectrum(ck):
            figures += [("spectrum-density", lambda: density_figure(ck, density_width),
                         "SLQ density of the Hessian eigenvalues"),
                        ("spectrum-blocks", lambda: blocks_figure(ck),
                         "top eigenvalues and traces of the diagonal blocks of the Hessian")]
        for name, draw, what in figures:
            fig = draw()
            try:
                written += save_figure(fig, out_dir / f"{ck.label}-{name}", f"{what}; {origin}")
            finally:
                plt.close(fig)
    return written
