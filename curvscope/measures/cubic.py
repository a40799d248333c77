"""The paper's regularised step (Wolinski, arXiv:2312.03885, §5): per-group learning rates from the
"anisotropic Nesterov" cubic regularisation, with the order-3 diagonal D.

With ḡ, H̄ (S×S) and D = Diag(D_s), D_s = ∂³L/∂η_s³ at η = 0 for η ↦ L(θ − Σ_t η_t U_t), and an internal
damping λ = λ_int > 0, the learning rates solve

    η = (H̄ + ½ λ ‖Dη‖ D²)⁻¹ ḡ,

the stationarity condition of the model −ḡᵀη + ½ηᵀH̄η + (λ/6)‖Dη‖³. Writing r = ‖Dη‖, η(r) = (H̄ + ½λrD²)⁻¹ḡ
and r is a root of φ(r) = ‖Dη(r)‖ − r, searched above r₀, the point where H̄ + ½λrD² becomes positive definite
(r₀ = 0 when H̄ is): r₀ = (2/λ) max(0, −λ_min(D⁻¹H̄D⁻¹)) when no |D_s| is below `singular_threshold`, else the
root of r ↦ λ_min(H̄ + ½λrD²). φ decreases above r₀; the root is bracketed by [r₀, r₁] with r₁ grown from
r₀ + 1 by factors of 3 until φ(r₁) < 0, and found by Brent's method. This is the algorithm of the author's
GroupedNewton (``nesterov_lrs``), whose order-3 vector is −D (a derivative along +U, not −U), with two
differences: its singularity test is on that signed value, this one on |D_s| (both give the same r₀); and
where the matrix is exactly singular at r₀ it restarts from 1.001 r₀, which can step past a root just above
r₀ (then it reports none), where this one restarts from the first representable r above r₀ that it can
solve at.

When there is no root (φ(r₀) ≤ 0, λ_min stays negative, or no bracket), the step is flagged as not found and
its learning rates are NaN: never a silent fallback.

The decrease predicted for a step is that of the cubic model of the issue,
q₃(η) = ḡᵀη − ½ηᵀH̄η − (λ/6) Σ_s |D_s| |η_s|³.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

DEFAULT_DAMPING_INT = 1.0  # the paper's λ_int
SINGULAR_THRESHOLD = 1e-5  # |D_s| below this: D is treated as singular (the author's threshold_D_sing)
GROWTH_LIMIT = 200  # most factor-3 growths of a bracket's upper end (3^200: beyond any float64 scale)
#: The figure's grid of λ_int: 10^-3 … 10^3.
DAMPING_GRID = tuple(10.0 ** e for e in range(-3, 4))


@dataclass(frozen=True)
class CubicStep:
    """The cubic-regularised learning rates for one λ_int, and how the search went."""

    damping_int: float
    learning_rates: np.ndarray  # η (S,); NaN when not found
    r: float  # ‖Dη‖ at the root (NaN when not found)
    r0: float  # where the search starts: H̄ + ½λ r D² ≻ 0 for r > r0
    start: str  # how r0 was found: "positive definite", "analytical" or "numerical"
    found: bool
    reason: str  # why not found ("" when found)
    residual: float  # ‖Mη − ḡ‖ / (‖M‖‖η‖ + ‖ḡ‖), M = H̄ + ½λ‖Dη‖D²: the fixed point's error (NaN if not found)
    predicted_decrease: float  # q₃(η) (NaN when not found)


def cubic_model(eta: np.ndarray, gbar: np.ndarray, hbar: np.ndarray, d: np.ndarray, damping_int: float) -> float:
    """q₃(η) = ḡᵀη − ½ηᵀH̄η − (λ/6) Σ_s |D_s||η_s|³: the decrease predicted for θ − Σ_s η_s U_s."""
    return float(gbar @ eta - 0.5 * eta @ hbar @ eta - damping_int / 6 * np.sum(np.abs(d) * np.abs(eta) ** 3))


def _smallest_eigenvalue(m: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(0.5 * (m + m.T))[0])


def _start(hbar: np.ndarray, d: np.ndarray, lam: float, threshold: float) -> tuple[float | None, str, str]:
    """(r0, how, why not) for the search; r0 None when there is none."""
    if _smallest_eigenvalue(hbar) > 0:
        return 0.0, "positive definite", ""
    if lam == 0:
        return None, "analytical", "H̄ is not positive definite and λ_int = 0: no regularised step exists"
    d2 = d * d
    if np.all(np.abs(d) > threshold):
        low = _smallest_eigenvalue(hbar / d[:, None] / d[None, :])
        return (2 / lam) * max(0.0, -low), "analytical", ""
    def smallest(x: float) -> float:
        return _smallest_eigenvalue(hbar + 0.5 * lam * x * np.diag(d2))
    hi, last = 1.0, smallest(1.0)
    for _ in range(GROWTH_LIMIT):
        if last > 0:
            break
        hi *= 3
        now = smallest(hi)
        if now <= last:  # λ_min never decreases in r; stuck: negative curvature where D_s = 0, never definite
            return None, "numerical", ("H̄ + ½λ r D² never becomes positive definite (negative curvature along "
                                       "groups whose order-3 value is about 0)")
        last = now
    else:
        return None, "numerical", "no r makes H̄ + ½λ r D² positive definite within float64's range"
    return float(brentq(smallest, 0.0, hi, maxiter=200)), "numerical", ""


def cubic_learning_rates(hbar: np.ndarray, gbar: np.ndarray, d: np.ndarray, damping_int: float = DEFAULT_DAMPING_INT,
                         *, singular_threshold: float = SINGULAR_THRESHOLD) -> CubicStep:
    """η = (H̄ + ½ λ_int ‖Dη‖ D²)⁻¹ ḡ by a bracketed root search on r = ‖Dη‖ (see the module docstring)."""
    hbar = 0.5 * (np.asarray(hbar, dtype=np.float64) + np.asarray(hbar, dtype=np.float64).T)
    gbar, d = np.asarray(gbar, dtype=np.float64), np.asarray(d, dtype=np.float64)
    lam = float(damping_int)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"λ_int must be a finite number ≥ 0, not {damping_int!r}")
    nan = np.full(len(gbar), np.nan)
    r0, how, why = _start(hbar, d, lam, singular_threshold)
    if r0 is None:
        return CubicStep(lam, nan, np.nan, np.nan, how, False, why, np.nan, np.nan)
    d2 = np.diag(d * d)

    def eta(x: float) -> np.ndarray:
        return np.linalg.solve(hbar + 0.5 * lam * x * d2, gbar)

    def phi(x: float) -> float:
        return float(np.linalg.norm(d * eta(x))) - x

    low, at_start = r0, np.nan
    for k in range(60):  # exactly singular at r0: φ → +∞ as r ↓ r0; start just above it
        try:
            at_start = phi(low)
            break
        except np.linalg.LinAlgError:
            low = r0 + max(r0, 1e-300) * 1e-15 * 2.0 ** k
    if not at_start > 0:
        return CubicStep(lam, nan, np.nan, r0, how, False,
                         f"φ(r0) = ‖Dη(r0)‖ − r0 = {at_start:.3g} ≤ 0: no root above r0", np.nan, np.nan)
    hi = low + 1.0
    for _ in range(GROWTH_LIMIT):
        if phi(hi) < 0:
            break
        hi *= 3
    else:
        return CubicStep(lam, nan, np.nan, r0, how, False, "no upper bracket for r within float64's range",
                         np.nan, np.nan)
    r = float(brentq(phi, low, hi, maxiter=100))
    step = eta(r)
    m = hbar + 0.5 * lam * np.linalg.norm(d * step) * d2
    scale = float(np.linalg.norm(m, 2) * np.linalg.norm(step) + np.linalg.norm(gbar))
    residual = float(np.linalg.norm(m @ step - gbar)) / max(scale, 1e-300)
    return CubicStep(lam, step, r, r0, how, True, "", residual, cubic_model(step, gbar, hbar, d, lam))
