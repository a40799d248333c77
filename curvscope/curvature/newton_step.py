"""The inverse of the pseudo-Hessian and the paper's per-group Newton step."""
from __future__ import annotations

import numpy as np

from curvscope.errors import CurvscopeError
from curvscope.results import NewtonStep


def _invert(h: np.ndarray, rcond: float) -> tuple[np.ndarray, np.ndarray, bool, int, float]:
    """(inverse or Moore-Penrose pseudo-inverse, eigenvalues, singular?, rank, condition number) of a symmetric h."""
    S = h.shape[0]
    lam, vec = np.linalg.eigh(h)
    scale = np.abs(lam).max() if S else 0.0
    keep = np.abs(lam) > rcond * scale if scale > 0 else np.zeros(S, dtype=bool)
    rank = int(keep.sum())
    if rank < S:
        return (vec[:, keep] / lam[keep]) @ vec[:, keep].T, lam, True, rank, float("inf")
    inv = np.linalg.inv(h)
    return 0.5 * (inv + inv.T), lam, False, rank, float(scale / np.abs(lam).min())


def newton_step(pseudo_hessian: np.ndarray, pseudo_gradient: np.ndarray,
                rcond: float | None = None) -> NewtonStep:
    """H̄⁻¹ (pseudo-inverse when singular), its spectrum, η* = H̄⁻¹ḡ and q(η*) = ½ḡᵀH̄⁻¹ḡ.

    Groups whose gradient is exactly zero (ḡ_s = ‖g_s‖² = 0, so U_s = 0 and
    their rows of H̄ vanish) are excluded: the inverse is taken over the other
    groups and is zero in their rows and columns. The rest is singular when
    some |λ| <= rcond·max|λ|, rcond defaulting to S·eps (float64). The matrix is
    symmetrised before use; nothing is regularised. Non-finite entries raise
    :class:`CurvscopeError`: no definiteness is claimed of a matrix with NaN.
    """
    h = 0.5 * (np.asarray(pseudo_hessian, dtype=np.float64) + np.asarray(pseudo_hessian).T)
    g = np.asarray(pseudo_gradient, dtype=np.float64)
    if not (np.isfinite(h).all() and np.isfinite(g).all()):
        raise CurvscopeError("the pseudo-Hessian or pseudo-gradient has NaN or infinite entries, so it has no "
                             "inverse and no Newton step: the curvature overflowed; analyse with --dtype float64 "
                             "or check the weights and data.")
    S = h.shape[0]
    rcond = S * np.finfo(np.float64).eps if rcond is None else rcond
    excluded = g == 0
    kept = np.flatnonzero(~excluded)
    inv = np.zeros_like(h)
    sub, lam_kept, singular, rank, cond = _invert(h[np.ix_(kept, kept)], rcond)
    inv[np.ix_(kept, kept)] = sub
    eta = inv @ g
    return NewtonStep(inverse=inv, method="pseudo-inverse" if singular else "inverse",
                      eigenvalues=np.linalg.eigvalsh(h), condition_number=cond,
                      positive_definite=bool(len(kept) and not singular and lam_kept.min() > 0),
                      rank=rank, learning_rates=eta, predicted_decrease=float(0.5 * g @ eta), excluded=excluded)
