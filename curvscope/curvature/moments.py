"""Streamed weighted moments of per-batch quantities: the mean and its standard error across batches, in
memory that does not grow with the number of batches.

For per-batch values x_b (arrays of one shape) with weights w_b = n_b/N (Σ_b w_b = 1),

    mean   = Σ_b w_b x_b
    stderr = sqrt(B/(B−1) Σ_b w_b² (x_b − mean)²)

(the standard error of a weighted mean of B batch estimates). Both come from running sums, shifted by a
fixed reference K (the first value added) so that the variance does not cancel catastrophically:
with d_b = x_b − K and m = mean − K,

    Σ_b w_b² (x_b − mean)² = Σ w_b² d_b² − 2 m Σ w_b² d_b + m² Σ w_b².

Sums taken with different references add once moved to a common one (:meth:`WeightedMoments.summed`, for the
ranks of a distributed run): with δ = K_r − K, Σ w² (x − K) = Σ w² d + δ Σ w² and
Σ w² (x − K)² = Σ w² d² + 2δ Σ w² d + δ² Σ w².
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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

    def summed(self, add: Callable[[np.ndarray], np.ndarray]) -> "WeightedMoments":
        """The moments of every batch of every process, `add` summing a float64 array over them (e.g.
        :func:`curvscope.curvature.ranks.all_sum_array`); the reference is the mean of the processes' own."""
        mean = self.mean
        has = float(self.count > 0)
        shift = np.zeros_like(mean) if self.shift is None else self.shift
        common = add(np.concatenate([[has], (has * shift).reshape(-1)]))
        if common[0] == 0:
            return self
        k = common[1:].reshape(mean.shape) / common[0]
        delta = shift - k
        first = self.first + delta * self.weight2
        second = self.second + 2 * delta * self.first + delta * delta * self.weight2
        parts = [np.asarray(a, dtype=np.float64) * np.ones_like(mean) for a in (self.total, first, second)]
        total = add(np.concatenate([[self.count, self.weight2]] + [a.reshape(-1) for a in parts]))
        size = mean.size
        out = [total[2 + i * size:2 + (i + 1) * size].reshape(mean.shape) for i in range(3)]
        return WeightedMoments(k, int(round(total[0])), out[0], float(total[1]), out[1], out[2])
