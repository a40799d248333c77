"""The inverse of the pseudo-Hessian and the paper's per-group Newton step; when it is singular, the groups that
make it so (:func:`collinear_groups`)."""
from __future__ import annotations

from typing import Sequence

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


def collinear_groups(pseudo_hessian: np.ndarray, pseudo_gradient: np.ndarray, rcond: float | None = None,
                     share: float = 0.1) -> list[list[int]]:
    """The sets of groups that make C̄ singular: empty when C̄, restricted to the groups :func:`newton_step`
    keeps (nonzero gradient), is nonsingular by its criterion (no |λ| <= rcond·max|λ|, rcond = S·eps).

    A group with (numerically) no curvature along its gradient, |C̄_ss| <= rcond·max|λ|, is a set by itself.
    For the others, each eigenvector v of C̄'s null space gives the groups s whose share |v_s|·sqrt|C̄_ss| (v_s
    measured in the scale-free coordinates of N(C̄), so a group's size or scale does not hide it) is at least
    `share` times the largest: the groups whose directions J U_s combine to nothing (for the GGN and the
    Fisher, columns of a Gram matrix that are linearly dependent; e.g. two copies of one layer). Sets that
    share a group are merged. Group indices are those of C̄, sorted.
    """
    h = 0.5 * (np.asarray(pseudo_hessian, dtype=np.float64) + np.asarray(pseudo_hessian, dtype=np.float64).T)
    g = np.asarray(pseudo_gradient, dtype=np.float64)
    if not (np.isfinite(h).all() and np.isfinite(g).all()):
        return []
    rcond = h.shape[0] * np.finfo(np.float64).eps if rcond is None else rcond
    kept = np.flatnonzero(g != 0)
    if not len(kept):
        return []
    sub = h[np.ix_(kept, kept)]
    lam, vec = np.linalg.eigh(sub)
    scale = float(np.abs(lam).max())
    tol = rcond * scale
    null = np.abs(lam) <= tol if scale > 0 else np.ones(len(lam), dtype=bool)
    if not null.any():
        return []
    diag = np.abs(np.diag(sub))
    flat = diag <= tol  # no curvature along its gradient: singular by itself
    sets: list[set[int]] = [{int(i)} for i in np.flatnonzero(flat)]
    for v in vec[:, null].T:
        v = np.where(flat, 0.0, np.abs(v))
        if v.max() <= 1e-6:  # this null direction lies on the groups without curvature
            continue
        w = v * np.sqrt(diag)
        sets.append({int(i) for i in np.flatnonzero(w >= share * w.max())})
    merged: list[set[int]] = []
    for s in sets:
        for other in [m for m in merged if m & s]:
            s |= other
            merged.remove(other)
        merged.append(s)
    return sorted(sorted(int(kept[i]) for i in s) for s in merged)


def collinear_description(names: Sequence[str], sets: list[list[int]]) -> str:
    """:func:`collinear_groups` in words: "fc1.weight ~ fc2.weight; fc3.bias (no curvature along its gradient)"
    ("~" joins the groups of one set, "; " separates sets), or "" when there is none."""
    return "; ".join(f"{names[s[0]]} (no curvature along its gradient)" if len(s) == 1
                     else " ~ ".join(names[i] for i in s) for s in sets)
