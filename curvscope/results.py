"""Result objects: what the engines return and the store writes (numpy float64)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PseudoHessianResult:
    """ḡ_s = U_sᵀg and H̄_st = U_sᵀ H U_t over a partition, with the direction u = g = ∇L(θ).

    `pseudo_hessian_stderr` is the standard error of H̄ across batches,
    sqrt(B/(B-1) Σ_b w_b² (H̄_b - H̄)²) with w_b = n_b/N (NaN for a single batch).
    """

    names: np.ndarray  # (S,) str
    kinds: np.ndarray  # (S,) str: weight | bias | other
    layers: np.ndarray  # (S,) str
    sizes: np.ndarray  # (S,) int64
    partition: str
    pseudo_gradient: np.ndarray  # (S,)
    pseudo_hessian: np.ndarray  # (S, S)
    pseudo_hessian_stderr: np.ndarray  # (S, S)
    loss: float  # L(θ) over the analysis set
    n_samples: int
    n_batches: int
    strategy: str  # how the Hessian-vector products were batched


@dataclass(frozen=True)
class NewtonStep:
    """H̄⁻¹ and the per-group step it gives (DESIGN.md §2).

    `method` is "inverse" when H̄ is nonsingular, else "pseudo-inverse"
    (Moore-Penrose, eigenvalues with |λ| <= rcond·max|λ| dropped); H̄ is never
    regularised. η* = H̄⁻¹ḡ; the quadratic model q(η) = ḡᵀη - ½ηᵀH̄η predicts a
    decrease q(η*) = ½ḡᵀH̄⁻¹ḡ.
    """

    inverse: np.ndarray  # (S, S)
    method: str
    eigenvalues: np.ndarray  # (S,) of H̄, ascending
    condition_number: float  # max|λ| / min|λ|, inf when singular
    positive_definite: bool
    rank: int
    learning_rates: np.ndarray  # (S,) η*
    predicted_decrease: float
