"""Lanczos in torch: extreme eigenpairs with residuals, and Gauss quadrature for SLQ.

The three-term recurrence runs in float64 on the operator's device, with full
reorthogonalisation (classical Gram-Schmidt, twice) against the whole Krylov
basis, so Ritz values do not duplicate. After m steps, T_m = QᵀHQ is
tridiagonal; its eigenpairs (θ_i, s_i) give Ritz pairs (θ_i, Q s_i) whose
residual ‖H x_i − θ_i x_i‖ equals |β_m s_{m,i}| in exact arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

MatVec = Callable[[torch.Tensor], torch.Tensor]
MIN_CHECK_STEPS = 8  # the check run's Krylov space must be at least this large before it can clear
BREAKDOWN = 1e-12  # β_j <= BREAKDOWN·max|α|: the Krylov space is invariant, the Ritz values are exact


@dataclass(frozen=True)
class Krylov:
    """m Lanczos steps: basis Q (m x n), diagonal α (m,) and off-diagonal β (m,) of T_m; β[-1] is the residual norm."""

    basis: torch.Tensor
    alpha: np.ndarray
    beta: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.alpha)

    @property
    def invariant(self) -> bool:
        """True when the recurrence broke down: span(Q) is an invariant subspace."""
        return bool(self.beta[-1] <= BREAKDOWN * max(np.abs(self.alpha).max(), 1e-300))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), the eigenvectors of T_m (columns) and the residual estimates |β_m s_{m,i}|."""
        theta, s = eigh_tridiagonal(self.alpha, self.beta[:-1])
        est = np.abs(self.beta[-1] * s[-1]) if not self.invariant else np.zeros_like(theta)
        return theta, s, est


def _orthogonalise(w: torch.Tensor, *bases: torch.Tensor | None) -> torch.Tensor:
    for _ in range(2):  # "twice is enough" (Giraud et al.)
        for q in bases:
            if q is not None and q.shape[0]:
                w = w - q.T @ (q @ w)
    return w


def lanczos(matvec: MatVec, start: torch.Tensor, steps: int, *, locked: torch.Tensor | None = None,
            stop: Callable[[Krylov], bool] | None = None, check_every: int = 4) -> Krylov:
    """Up to `steps` Lanczos steps from `start`, kept orthogonal to the rows of `locked`.

    `stop(krylov)` is asked every `check_every` steps; the run also ends when
    the Krylov space becomes invariant.
    """
    n = start.numel()
    steps = max(1, min(steps, n - (0 if locked is None else locked.shape[0])))
    basis = torch.zeros(steps, n, dtype=torch.float64, device=start.device)
    q = _orthogonalise(start.to(torch.float64), locked)
    q = q / torch.linalg.vector_norm(q)
    alpha, beta = [], []
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        alpha.append(float(q @ w))
        w = _orthogonalise(w, basis[:j + 1], locked)
        beta.append(float(torch.linalg.vector_norm(w)))
        krylov = Krylov(basis[:j + 1], np.asarray(alpha), np.asarray(beta))
        if krylov.invariant or j + 1 == steps:
            return krylov
        if stop is not None and (j + 1) % check_every == 0 and stop(krylov):
            return krylov
        q = w / beta[-1]
    return krylov


def random_start(n: int, generator: torch.Generator, device: torch.device, rademacher: bool = False) -> torch.Tensor:
    """A seeded N(0, I) (or ±1) vector, drawn on the CPU so that seeds give the same vector on every device."""
    if rademacher:
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=generator, dtype=torch.float64)
    return v.to(device)


@dataclass(frozen=True)
class Eigenpairs:
    """The k most extreme eigenvalues of one end, most extreme first, with true residuals."""

    values: np.ndarray
    vectors: torch.Tensor  # (k, n), unit rows
    residuals: np.ndarray  # ‖H x − θ x‖, from one extra product per value
    converged: np.ndarray  # residual <= tol·‖H‖ (‖H‖: largest |Ritz value| seen), and the check run cleared it
    steps: int  # Lanczos steps, verification runs included
    verified: bool  # a deflated run from a fresh start found nothing beyond the k-th value


def extreme_eigenpairs(matvec: MatVec, n: int, k: int, largest: bool, *, tol: float, max_steps: int,
                       generator: torch.Generator, device: torch.device, verify: bool = True) -> Eigenpairs:
    """The k largest (or smallest) algebraic eigenpairs of the symmetric operator `matvec`.

    Lanczos runs until the residual estimates of the k wanted Ritz values are
    below tol·‖H‖, or `max_steps`. A second, deflated run from a fresh start
    vector (kept orthogonal to the k Ritz vectors) then checks that no
    eigenvalue beyond the k-th θ_k was missed — a single Krylov space sees only
    one copy of a repeated eigenvalue. It clears the values once its top Ritz
    value θ' satisfies θ' + r' < θ_k (r' its residual estimate; after at least
    MIN_CHECK_STEPS steps, as extreme eigenvalues are the first a Krylov space
    resolves); an eigenvalue it finds beyond θ_k replaces the k-th, and the
    check repeats. The check is skipped when the first run did not settle (the
    values are then flagged unconverged anyway). Finally each Ritz pair's true
    residual is measured.
    """
    sign = 1.0 if largest else -1.0

    def op(v: torch.Tensor) -> torch.Tensor:
        return sign * matvec(v)

    k = max(1, min(k, n))
    scale = [0.0]

    def settled(want: int) -> Callable[[Krylov], bool]:
        def check(kr: Krylov) -> bool:
            theta, _, est = kr.ritz()
            scale[0] = max(scale[0], float(np.abs(theta).max()))
            return kr.steps >= want and bool(np.all(est[-want:] <= tol * scale[0]))
        return check

    first = lanczos(op, random_start(n, generator, device), max_steps, stop=settled(k))
    theta, s, est = first.ritz()
    scale[0] = max(scale[0], float(np.abs(theta).max()))
    order = np.argsort(-theta)[:k]
    settled_first = bool(np.all(est[order] <= tol * scale[0]))
    values = list(theta[order])
    vectors = torch.as_tensor(s[:, order].T, device=device) @ first.basis
    steps, verified = first.steps, False
    while verify and settled_first and len(values) == k and k < n:
        kth = values[-1]

        def decided(kr: Krylov) -> bool:
            th, _, est_ = kr.ritz()
            i = int(np.argmax(th))
            below = kr.steps >= MIN_CHECK_STEPS and th[i] + est_[i] < kth
            return below or (th[i] > kth + tol * scale[0] and est_[i] <= tol * scale[0])

        check = lanczos(op, random_start(n, generator, device), max_steps, locked=vectors, stop=decided,
                        check_every=2)
        steps += check.steps
        th2, s2, est2 = check.ritz()
        top = int(np.argmax(th2))
        if th2[top] <= kth + tol * scale[0]:
            verified = bool(th2[top] + est2[top] < kth or est2[top] <= tol * scale[0])
            break
        x = torch.as_tensor(s2[:, top], device=device) @ check.basis  # a missed eigenpair
        pos = int(np.searchsorted(-np.asarray(values), -th2[top]))
        values.insert(pos, float(th2[top]))
        vectors = torch.cat([vectors[:pos], x[None], vectors[pos:]])[:k]
        values = values[:k]
    vals = np.asarray(values)
    residuals = np.array([float(torch.linalg.vector_norm(op(x) - v * x)) for v, x in zip(vals, vectors)])
    converged = residuals <= tol * scale[0]
    if verify and k < n:
        converged &= verified
    return Eigenpairs(sign * vals, vectors, residuals, converged, steps, verified or k == n)


def quadrature(matvec: MatVec, start: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure of `start`: nodes θ_i and weights (s_{1,i})², summing to 1."""
    krylov = lanczos(matvec, start, steps)
    theta, s, _ = krylov.ritz()
    return theta, s[0] ** 2
