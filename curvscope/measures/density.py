"""Spectral densities from stored quadrature nodes and weights (no recomputation)."""
from __future__ import annotations

import numpy as np

DEFAULT_WIDTH = 0.01  # σ as a fraction of the span of the nodes
GRID_POINTS = 1000


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, sigma: float | None = None,
                     width: float = DEFAULT_WIDTH, grid: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """(grid, density, σ): (1/n_v) Σ_r Σ_j w_rj N(x; θ_rj, σ²), integrating to 1 over the grid.

    σ defaults to `width` x (max θ − min θ); the default grid spans the nodes
    ± 5σ in GRID_POINTS points. NaN nodes (runs that ended early) are ignored.
    """
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    ok = np.isfinite(nodes)
    lo, hi = float(nodes[ok].min()), float(nodes[ok].max())
    if sigma is None:
        sigma = width * (hi - lo) if hi > lo else max(abs(hi), 1.0) * width
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, GRID_POINTS)
    th, w = nodes[ok], weights[ok]
    z = (grid[:, None] - th[None, :]) / sigma
    dens = (np.exp(-0.5 * z ** 2) @ w) / (sigma * np.sqrt(2 * np.pi) * nodes.shape[0])
    return grid, dens, float(sigma)
