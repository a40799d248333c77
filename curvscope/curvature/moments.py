"""Streamed weighted moments of per-batch quantities: the mean and its standard error across batches, in
memory that does not grow with the number of batches.

For per-batch values x_b (arrays of one shape) with weights w_b = n_b/N (Σ_b w_b = 1),

    mean   = Σ_b w_b x_b
    stderr = sqrt(B/(B−1) Σ_b w_b² (x_b − mean)²)

(the standard error of a weighted mean of B batch estimates). Both come from running sums, shifted by a
fixed reference K (the first value added) so that the variance does not cancel catastrophically:
with d_b = x_b − K and m = mean − K,

    Σ_b w_b² (x_b − mean)² = Σ w_b² d_b² − 2 m Σ w_b² d_b + m² Σ w_b².
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WeightedMoments:
    """Running sums of weighted per-batch arrays (see the module docstring)."""

    shift: np.ndarray | None = None  # K; the first value added when not given
    count: int = 0  # B
    total: np.ndarray | float = 0.0  # Σ w x
    weight2: float = 0.0  # Σ w²
    first: np.ndarray | float = 0.0  # Σ w² d
    second: np.ndarray | float = 0.0  # Σ w² d²

    def add(self, w: float, x: np.ndarray) -> None:
        """Take in batch value x with weight w."""
        x = np.asarray(x, dtype=np.float64)
        if self.shift is None:
            self.shift = x.copy()
        d = x - self.shift
        self.count += 1
        self.total = self.total + w * x
        self.weight2 += w * w
        self.first = self.first + (w * w) * d
        self.second = self.second + (w * w) * d * d

    @property
    def mean(self) -> np.ndarray:
        """Σ_b w_b x_b."""
        return np.asarray(self.total, dtype=np.float64)

    @property
    def stderr(self) -> np.ndarray:
        """sqrt(B/(B−1) Σ_b w_b² (x_b − mean)²); NaN for one batch."""
        mean = self.mean
        if self.count < 2:
            return np.full_like(mean, np.nan)
        m = mean - (self.shift if self.shift is not None else 0.0)
        spread = self.second - 2 * m * self.first + m * m * self.weight2
        return np.sqrt(self.count / (self.count - 1) * np.maximum(spread, 0.0))
