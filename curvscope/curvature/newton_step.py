"""The inverse of the pseudo-Hessian and the paper's per-group Newton step."""
from __future__ import annotations

import numpy as np

from curvscope.results import NewtonStep


def newton_step(pseudo_hessian: np.ndarray, pseudo_gradient: np.ndarray,
                rcond: float | None = None) -> NewtonStep:
    """H̄⁻¹ (pseudo-inverse when singular), its spectrum, η* = H̄⁻¹ḡ and q(η*) = ½ḡᵀH̄⁻¹ḡ.

    H̄ is singular when some |λ| <= rcond·max|λ|, rcond defaulting to S·eps
    (float64). The matrix is symmetrised before use; nothing is regularised.
    """
    h = 0.5 * (np.asarray(pseudo_hessian, dtype=np.float64) + np.asarray(pseudo_hessian).T)
    g = np.asarray(pseudo_gradient, dtype=np.float64)
    S = h.shape[0]
    rcond = S * np.finfo(np.float64).eps if rcond is None else rcond
    lam, vec = np.linalg.eigh(h)
    scale = np.abs(lam).max() if S else 0.0
    keep = np.abs(lam) > rcond * scale if scale > 0 else np.zeros(S, dtype=bool)
    rank = int(keep.sum())
    inv = (vec[:, keep] / lam[keep]) @ vec[:, keep].T
    singular = rank < S
    if not singular:
        inv = np.linalg.inv(h)
        inv = 0.5 * (inv + inv.T)
    cond = float("inf") if singular else float(scale / np.abs(lam).min())
    eta = inv @ g
    return NewtonStep(inverse=inv, method="pseudo-inverse" if singular else "inverse", eigenvalues=lam,
                      condition_number=cond, positive_definite=bool(not singular and lam.min() > 0),
                      rank=rank, learning_rates=eta, predicted_decrease=float(0.5 * g @ eta))
