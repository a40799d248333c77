"""Lanczos in torch: extreme eigenpairs with residuals, and Gauss quadrature for SLQ.

The three-term recurrence runs in float64 on the operator's device with full
reorthogonalisation against the whole Krylov basis (one classical
Gram-Schmidt pass, a second one only when the first cancels much of the
vector: the DGKS criterion), so Ritz values do not duplicate. Every
coefficient removed from H q_j is recorded, which gives the exact relation

    H Q_m = Q_m (T_m + E_m) + β_m q_{m+1} e_mᵀ + Lᵀ D_m

with T_m tridiagonal (α, β), E_m the reorthogonalisation coefficients and D_m
the components along locked vectors L. A Ritz pair (θ, x = Q_m s) of T_m has
the residual ‖H x − θ x‖² = ‖E_m s‖² + ‖D_m s‖² + (β_m s_m)², known without
another product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal


class MatVec(Protocol):
    """v ↦ H v for a symmetric H, in float64: written into `out` when given, else a new tensor."""

    def __call__(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


MIN_CHECK_STEPS = 8  # the check run's Krylov space must be at least this large before it can clear
BREAKDOWN = 1e-12  # β_j <= BREAKDOWN·max|α|: the Krylov space is invariant, the Ritz values are exact
DGKS = 2 ** -0.5  # reorthogonalise again when a pass leaves less than this fraction of the vector's norm


@dataclass(frozen=True)
class Krylov:
    """m Lanczos steps: basis Q (m x n), T_m's diagonal α and off-diagonal β (β[-1] is β_m), and the
    coefficients beyond T_m, `extra` ((m + locked) x m: E_m stacked on D_m)."""

    basis: torch.Tensor
    alpha: np.ndarray
    beta: np.ndarray
    extra: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.alpha)

    @property
    def invariant(self) -> bool:
        """True when the recurrence broke down: span(Q) is an invariant subspace."""
        return bool(self.beta[-1] <= BREAKDOWN * max(np.abs(self.alpha).max(), 1e-300))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), the eigenvectors s_i of T_m (columns) and the residuals ‖H Q s_i − θ_i Q s_i‖."""
        theta, s = eigh_tridiagonal(self.alpha, self.beta[:-1])
        tail = 0.0 if self.invariant else self.beta[-1] * s[-1]
        return theta, s, np.sqrt(np.sum((self.extra @ s) ** 2, axis=0) + tail ** 2)


def _project_out(w: torch.Tensor, bases: list[torch.Tensor]) -> np.ndarray:
    """Remove from w, in place, its components along the rows of `bases` (one classical Gram-Schmidt
    pass); return those components. In place because a new vector of a large model's size costs more
    in page faults than the arithmetic."""
    coef = torch.cat([q @ w for q in bases])
    start = 0
    for q in bases:
        w.addmv_(q.T, coef[start:start + q.shape[0]], alpha=-1)
        start += q.shape[0]
    return coef.cpu().numpy()


def lanczos(matvec: MatVec, start: torch.Tensor, steps: int, *, locked: torch.Tensor | None = None,
            stop: Callable[[Krylov], bool] | None = None) -> Krylov:
    """Up to `steps` Lanczos steps from `start`, kept orthogonal to the rows of `locked`.

    `stop(krylov)` is asked after every step; the run also ends when the
    Krylov space becomes invariant. Every product is written into one
    vector: a new vector of a large model's size costs page faults.
    """
    n = start.numel()
    locked = torch.zeros(0, n, dtype=torch.float64, device=start.device) if locked is None else locked
    n_locked = locked.shape[0]
    steps = max(1, min(steps, n - n_locked))
    basis = torch.empty(steps, n, dtype=torch.float64, device=start.device)
    w = torch.empty(n, dtype=torch.float64, device=start.device)
    extra = np.zeros((steps + n_locked, steps))
    basis[0] = start
    for _ in range(2):
        _project_out(basis[0], [locked])
    basis[0] /= torch.linalg.vector_norm(basis[0])
    alpha, beta = np.zeros(steps), np.zeros(steps)
    for j in range(steps):
        q = basis[j]
        matvec(q, w)
        alpha[j] = float(q @ w)
        w.sub_(q, alpha=alpha[j])
        if j:
            w.sub_(basis[j - 1], alpha=beta[j - 1])
        for _ in range(2):  # full reorthogonalisation; the second pass only when DGKS asks for it
            before = float(torch.linalg.vector_norm(w))
            coef = _project_out(w, [basis[:j + 1], locked])
            alpha[j] += coef[j]
            coef[j] = 0.0
            extra[:j + 1, j] += coef[:j + 1]
            extra[steps:, j] += coef[j + 1:]
            beta[j] = float(torch.linalg.vector_norm(w))
            if beta[j] >= DGKS * before:
                break
        krylov = Krylov(basis[:j + 1], alpha[:j + 1], beta[:j + 1],
                        np.concatenate([extra[:j + 1, :j + 1], extra[steps:, :j + 1]]))
        if krylov.invariant or j + 1 == steps or (stop is not None and stop(krylov)):
            return krylov
        torch.div(w, beta[j], out=basis[j + 1])
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
    residuals: np.ndarray  # ‖H x − θ x‖, from the run's recorded Lanczos relation (no extra products)
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
    values are then flagged unconverged anyway). Residuals come from each run's
    recorded relation (see the module docstring), reorthogonalisation included.
    """
    sign = 1.0 if largest else -1.0

    def op(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return matvec(v, out) if largest else matvec(v, out).neg_()  # in place: no second model-sized vector

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
    values, residuals = list(theta[order]), list(est[order])
    vectors = torch.as_tensor(s[:, order].T, device=device) @ first.basis
    steps, verified = first.steps, False
    while verify and settled_first and len(values) == k and k < n:
        kth = values[-1]

        def decided(kr: Krylov) -> bool:
            th, _, est_ = kr.ritz()
            i = int(np.argmax(th))
            below = kr.steps >= MIN_CHECK_STEPS and th[i] + est_[i] < kth
            return below or (th[i] > kth + tol * scale[0] and est_[i] <= tol * scale[0])

        check = lanczos(op, random_start(n, generator, device), max_steps, locked=vectors, stop=decided)
        steps += check.steps
        th2, s2, est2 = check.ritz()
        top = int(np.argmax(th2))
        if th2[top] <= kth + tol * scale[0]:
            verified = bool(th2[top] + est2[top] < kth or est2[top] <= tol * scale[0])
            break
        x = torch.as_tensor(s2[:, top], device=device) @ check.basis  # a missed eigenpair
        pos = int(np.searchsorted(-np.asarray(values), -th2[top]))
        values.insert(pos, float(th2[top]))
        residuals.insert(pos, float(est2[top]))
        vectors = torch.cat([vectors[:pos], x[None], vectors[pos:]])[:k]
        values, residuals = values[:k], residuals[:k]
    vals, res = np.asarray(values), np.asarray(residuals)
    converged = res <= tol * scale[0]
    if verify and k < n:
        converged &= verified
    return Eigenpairs(sign * vals, vectors, res, converged, steps, verified or k == n)


def quadrature(matvec: MatVec, start: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure of `start`: nodes θ_i and weights (s_{1,i})², summing to 1."""
    krylov = lanczos(matvec, start, steps)
    theta, s, _ = krylov.ritz()
    return theta, s[0] ** 2
