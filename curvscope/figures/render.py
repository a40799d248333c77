"""Every figure of a results file, drawn from the stored data alone."""
from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from matplotlib.figure import Figure

from curvscope.errors import CurvscopeError, summary
from curvscope.figures.cubic import cubic_figure, has_order3
from curvscope.figures.heatmaps import SCALES, heatmap_figure
from curvscope.figures.interactions import distance_figure, has_interactions, outlined_heatmap_figure, steps_figure
from curvscope.figures.kfac import has_kfac, kfac_figure
from curvscope.figures.output import save_figure
from curvscope.figures.spectra import blocks_figure, density_figure, has_spectrum
from curvscope.figures.titles import matrix_names
from curvscope.store.hdf5 import StoredCheckpoint, read_results

TRAJECTORY = "trajectory"


def default_figure_dir(results: Path) -> Path:
    """Where the figures of `results` go by default: a folder beside it named after it."""
    return results.with_suffix("")


def trajectory_base(curvature: str) -> str:
    """The file name stem of a trajectory's heatmaps: ``trajectory`` for the Hessian (as before curvatures
    were recorded), ``trajectory-<curvature>`` for the others."""
    return TRAJECTORY if curvature == "hessian" else f"{TRAJECTORY}-{curvature}"


def by_curvature(stored: Sequence[StoredCheckpoint]) -> dict[str, list[StoredCheckpoint]]:
    """The checkpoints grouped by the curvature they were analysed with, in order of first appearance."""
    groups: dict[str, list[StoredCheckpoint]] = {}
    for ck in stored:
        groups.setdefault(matrix_names(ck).kind.name, []).append(ck)
    return groups


def _refuse_unused(results: Path, stored: list[StoredCheckpoint], trajectory: bool, density_width: float | None,
                   grey_insignificant: bool, shared_scale: bool) -> None:
    """Refuse a figure option that no figure of these checkpoints would use: a result the user thinks they drew."""
    unused = []
    if density_width is not None and not any(has_spectrum(ck) for ck in stored):
        unused.append("--density-width redraws the spectral density, but no checkpoint rendered has spectra")
    if grey_insignificant and not any(has_interactions(ck) and int(ck["interactions/significant_count"]) >= 0
                                      for ck in stored):
        unused.append("--grey-insignificant greys entries within 2 standard errors, but no checkpoint rendered "
                      "has standard errors (one batch gives none)")
    if shared_scale and not trajectory:
        unused.append("--shared-scale shares colour limits across the checkpoints of a trajectory figure, but the "
                      "checkpoints rendered make none (it needs several of one model)")
    if unused:
        raise CurvscopeError(f"{'; '.join(unused)} in {str(results)!r}: leave {'it' if len(unused) == 1 else 'them'}"
                             f" out.")


def render(results: Path, out_dir: Path | None = None, scales: Sequence[str] = ("linear",),
           labels: Sequence[str] | None = None, density_width: float | None = None,
           grey_insignificant: bool = False, shared_scale: bool = False) -> list[Path]:
    """Draw the figures of every (or each named) checkpoint of `results` as PDF and PNG in `out_dir`.

    ``<label>-heatmaps-<scale>`` per scale; ``<label>-interactions-{distance,steps,blocks}``
    (the last with entries within 2 standard errors greyed when `grey_insignificant`); ``<label>-kfac`` for a
    GGN or Fisher record with K-FAC; with spectra,
    ``<label>-spectrum-density`` (redrawn with σ = `density_width` x span when given) and
    ``<label>-spectrum-blocks``. Labels name the curvature (``x`` for the Hessian, ``x@ggn``, ``x@fisher``).
    With several checkpoints of one model analysed with one curvature, also
    ``trajectory-heatmaps-<scale>`` (Hessian) or ``trajectory-<curvature>-heatmaps-<scale>``: all of them
    side by side, with colour limits shared across checkpoints when `shared_scale`. A trajectory never
    mixes curvatures.
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
    trajectories = {curvature: group for curvature, group in by_curvature(stored).items()
                    if len(group) >= 2 and len({tuple(ck["partition/name"]) for ck in group}) == 1}
    _refuse_unused(results, stored, bool(trajectories), density_width, grey_insignificant, shared_scale)
    out_dir = out_dir or default_figure_dir(results)
    written: list[Path] = []
    for curvature, group in trajectories.items():  # several checkpoints of one model, per curvature
        names = matrix_names(group[0])
        for scale in scales:
            written += _save(partial(heatmap_figure, group, scale, shared_scale),
                             out_dir / f"{trajectory_base(curvature)}-heatmaps-{scale}",
                             f"heatmaps of the {names.pseudo} {names.bar} and its inverse across "
                             f"checkpoints {', '.join(ck.label for ck in group)} of {results.name}, "
                             f"{scale} scale")
    for ck in stored:
        names = matrix_names(ck)
        origin = (f"checkpoint {ck.label!r} of {results.name} (source {ck.attrs.get('source')}, "
                  f"sha256 {ck.attrs.get('sha256')})")
        figures: list[tuple[str, Callable[[], Figure], str]] = [
            (f"heatmaps-{scale}", partial(heatmap_figure, ck, scale),
             f"heatmaps of the {names.pseudo} {names.bar} and its inverse, {scale} scale")
            for scale in scales]
        if has_interactions(ck):
            figures += [("interactions-distance", lambda: distance_figure(ck),
                         f"interaction between layers in {names.bar} and its inverse against their distance"),
                        ("interactions-steps", lambda: steps_figure(ck),
                         f"step efficiency under {names.bar} and predicted against actual loss decrease"),
                        ("interactions-blocks", lambda: outlined_heatmap_figure(ck, grey_insignificant),
                         f"normalised {names.pseudo} {names.bar} and its inverse with the layer blocks outlined")]
        if has_kfac(ck):
            figures.append(("kfac", lambda: kfac_figure(ck),
                            f"K-FAC's blocks against the exact layer blocks of {names.bar} along the gradient, per "
                            f"layer and for the whole model"))
        if has_order3(ck):
            figures.append(("cubic", lambda: cubic_figure(ck),
                            f"the cubic-regularised step's predicted and actual loss decrease against λ_int, and the "
                            f"order-3 diagonal of {names.matrix} along the gradient"))
        if has_spectrum(ck):
            figures += [("spectrum-density", lambda: density_figure(ck, density_width),
                         f"SLQ density of the eigenvalues of {names.matrix}"),
                        ("spectrum-blocks", lambda: blocks_figure(ck),
                         f"top eigenvalues and traces of the diagonal blocks of {names.matrix}")]
        for name, draw, what in figures:
            written += _save(draw, out_dir / f"{ck.label}-{name}", f"{what}; {origin}")
    return written


def _save(draw: Callable[[], Figure], base: Path, description: str) -> list[Path]:
    """Draw and save one figure; stored values that cannot be drawn (a tampered file's 1e308 or all-NaN
    density) are reported as bad input."""
    try:
        with warnings.catch_warnings():  # overflow in colour scaling is reported below, not as numpy's warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return save_figure(draw(), base, description)
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise CurvscopeError(f"the figure {base.name} cannot be drawn from the values stored "
                             f"({summary(exc)}): the results file holds values no analysis writes; use an intact "
                             f"copy or analyse the checkpoint again.") from None
