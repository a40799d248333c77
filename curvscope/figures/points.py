"""Signed quantities with standard errors (block traces, the order-3 diagonal) as points with error bars, on a
scale that fits them: log, symmetric log or linear, never bars from an arbitrary floor."""
from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes

from curvscope.figures.interactions import symlog_bars

SIGN_COLOURS = {"positive": "#2166ac", "negative": "#d6604d"}


def signed_axis(ax: Axes, tr: np.ndarray, se: np.ndarray) -> str:
    """Scale `ax` for values `tr` ± `se`: "log" when every value is positive beyond its error and they span over a
    decade; "symlog" (linear near 0, with 0 shown) when they span decades but some are negative or within an error
    of 0; "linear" from 0 otherwise. The values are points, so no scale makes a length of an arbitrary floor."""
    ok = np.isfinite(tr) & np.isfinite(se)
    if not ok.any():
        return "linear"
    t, e = tr[ok], np.abs(se[ok])
    nonzero = np.abs(t[t != 0])
    wide = nonzero.size > 0 and nonzero.max() > 10 * nonzero.min()
    if wide and np.all(t - e > 0):
        ax.set_yscale("log")
        return "log"
    ends = np.concatenate([t - e, t + e])
    if wide and nonzero.max() > 100 * nonzero.min():
        # linear up to the power of ten below the smallest |value|, so that every point lies on the logarithmic
        # part (15 decades at most)
        linthresh = 10.0 ** np.floor(np.log10(max(nonzero.min(), 1e-15 * nonzero.max())))
        symlog_bars(ax, t, float(linthresh), also=tuple(ends))
        ax.axhline(0, color="black", lw=0.6, zorder=1)
        return "symlog"
    low, high = min(0.0, float(ends.min())), max(0.0, float(ends.max()))
    margin = 0.06 * (high - low) or 1.0
    ax.set_ylim(low - (margin if low < 0 else 0.0), high + (margin if high > 0 else 0.0))
    ax.axhline(0, color="black", lw=0.6, zorder=1)
    return "linear"


def signed_points(ax: Axes, tr: np.ndarray, se: np.ndarray, what: str) -> None:
    """Each value `tr`[i] at x = i as a point with its ± 1 s.e. bar `se`[i] (none where not finite), coloured by
    sign (a legend names them "positive `what`" and "negative `what`" when some are negative), on the scale of
    :func:`signed_axis`."""
    x = np.arange(len(tr))
    se = np.where(np.isfinite(se), se, 0.0)
    scale = signed_axis(ax, tr, se)
    for sign, where in (("positive", tr >= 0), ("negative", tr < 0)):
        if not where.any():
            continue
        ax.errorbar(x[where], tr[where], yerr=np.abs(se[where]), fmt="o", ms=5, color=SIGN_COLOURS[sign],
                    ecolor="black", elinewidth=1, capsize=3, zorder=3, gid=what,
                    label=f"{sign} {what}" if (tr < 0).any() else None)
    if (tr < 0).any():
        ax.legend(fontsize=7, loc="best")
    if scale == "log":
        ax.set_ylim(*_padded_log_limits(tr - np.abs(se), tr + np.abs(se)))


def _padded_log_limits(low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(low) & np.isfinite(high) & (low > 0)
    lo, hi = float(low[ok].min()), float(high[ok].max())
    pad = 0.06 * (np.log10(hi) - np.log10(lo))
    return 10 ** (np.log10(lo) - pad), 10 ** (np.log10(hi) + pad)
