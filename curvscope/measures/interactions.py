"""Interactions between layers, measured on stored matrices (issue: block-diagonal audit).

For M ∈ {H̄, H̄⁻¹} and a grouping A of the S groups (``tensor``: each group
alone, i.e. the diagonal; ``layer``: the tensors of one module together),
B_A(M) keeps the entries (s, t) with s and t in the same block of A and zeroes
the rest.

- off-block ratio r_A(M) = ‖N(M) − B_A(N(M))‖_F / ‖N(M)‖_F, also restricted
  to the weight-weight, bias-bias and weight-bias entries;
- distance profile: mean and max of |N(M)_st| over s ≠ t whose layers are k
  apart (layers numbered in order of their first parameter);
- step efficiency: q(η) = ḡᵀη − ½ηᵀH̄η, q* = q(η*) with η* = H̄⁻¹ḡ;
  η_A = B_A(H̄)⁻¹ḡ (block-diagonal Hessian), η'_A = B_A(H̄⁻¹)ḡ (block-diagonal
  inverse), Cauchy's η = (Σḡ / 1ᵀH̄1)·1; e = q(η)/q*, defined only when H̄ is
  positive definite;
- significance: off-diagonal entries with |H̄_st| > 2·stderr_st.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curvscope.measures.normalized import normalized, normalized_by

GROUPINGS = ("tensor", "layer")
PARTS = ("all", "weight-weight", "bias-bias", "weight-bias")
SIGNIFICANCE = 2.0  # standard errors


def layer_index(layers: np.ndarray) -> np.ndarray:
    """The layer number of each group, layers numbered in order of first appearance."""
    order: dict[str, int] = {}
    return np.array([order.setdefault(str(name) or f"#{i}", len(order)) for i, name in enumerate(layers)])


def block_mask(layers: np.ndarray, grouping: str) -> np.ndarray:
    """(S, S) bool: the entries B_A keeps for grouping A ("tensor": the diagonal; "layer": same layer)."""
    S = len(layers)
    if grouping == "tensor":
        return np.eye(S, dtype=bool)
    if grouping == "layer":
        idx = layer_index(layers)
        return idx[:, None] == idx[None, :]
    raise ValueError(f"unknown grouping {grouping!r}: choose one of {', '.join(GROUPINGS)}")


def part_mask(kinds: np.ndarray, part: str) -> np.ndarray:
    """(S, S) bool: the entries of one part (all, weight-weight, bias-bias, weight-bias and its mirror)."""
    w, b = kinds == "weight", kinds == "bias"
    if part == "all":
        return np.ones((len(kinds), len(kinds)), dtype=bool)
    if part == "weight-weight":
        return w[:, None] & w[None, :]
    if part == "bias-bias":
        return b[:, None] & b[None, :]
    if part == "weight-bias":
        return (w[:, None] & b[None, :]) | (b[:, None] & w[None, :])
    raise ValueError(f"unknown part {part!r}")


def relative_deviation(matrix: np.ndarray, approximation: np.ndarray, part: np.ndarray | None = None) -> float:
    """r = ‖N_M(M − M̂)‖_F / ‖N(M)‖_F over the entries of `part` (all when None), with N_M the scaling of N(M)
    (:func:`normalized_by`; entries of a zero diagonal count as 0): how far M̂ is from M; NaN when undefined."""
    n = np.nan_to_num(normalized(matrix))
    d = np.nan_to_num(normalized_by(np.asarray(matrix) - approximation, matrix))
    sel = np.ones(n.shape, dtype=bool) if part is None else part
    total = float(np.linalg.norm(n[sel]))
    if total == 0 or not sel.any():
        return float("nan")
    return float(np.linalg.norm(d[sel])) / total


def off_block_ratio(matrix: np.ndarray, keep: np.ndarray, part: np.ndarray | None = None) -> float:
    """r = ‖N(M) − B(N(M))‖_F / ‖N(M)‖_F over the entries of `part` (all when None); NaN when undefined:
    the relative deviation of the block-diagonal approximation B(M)."""
    return relative_deviation(matrix, np.where(keep, matrix, 0.0), part)


def distance_profile(matrix: np.ndarray, layers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For k = 0..K-1: mean and max of |N(M)_st| over s ≠ t with layers k apart, and how many pairs."""
    n = np.abs(np.nan_to_num(normalized(matrix)))
    idx = layer_index(layers)
    dist = np.abs(idx[:, None] - idx[None, :])
    off = ~np.eye(len(idx), dtype=bool)
    K = int(dist.max()) + 1 if len(idx) else 0
    mean, peak, count = np.full(K, np.nan), np.full(K, np.nan), np.zeros(K, dtype=np.int64)
    for k in range(K):
        sel = off & (dist == k)
        count[k] = int(sel.sum())
        if count[k]:
            mean[k], peak[k] = float(n[sel].mean()), float(n[sel].max())
    return mean, peak, count


def quadratic_model(eta: np.ndarray, gbar: np.ndarray, hbar: np.ndarray) -> float:
    """q(η) = ḡᵀη − ½ ηᵀH̄η, the decrease the quadratic model predicts for the step θ − Σ_s η_s U_s."""
    return float(gbar @ eta - 0.5 * eta @ hbar @ eta)


@dataclass(frozen=True)
class Step:
    """One per-group step η and the decrease the quadratic model predicts for it."""

    name: str  # "newton", "cauchy", "block-diagonal hessian (layer)", "block-diagonal inverse (tensor)", ...
    kind: str  # "newton" | "cauchy" | "hessian" | "inverse"
    grouping: str  # "" for newton and cauchy
    learning_rates: np.ndarray
    predicted: float  # q(η)
    efficiency: float  # q(η) / q(η*), NaN when H̄ is not positive definite


def steps(gbar: np.ndarray, hbar: np.ndarray, inverse: np.ndarray, layers: np.ndarray,
          positive_definite: bool) -> list[Step]:
    """Newton's η*, Cauchy's step, and η_A, η'_A for every grouping A, with q(η) and e = q(η)/q*.

    B_A(H̄) is inverted with the pseudo-inverse when singular (a zero-gradient group).
    """
    ones = np.ones(len(gbar))
    curv = float(ones @ hbar @ ones)
    raw = [("newton", "newton", "", inverse @ gbar),
           ("cauchy", "cauchy", "", ones * (gbar.sum() / curv if curv != 0 else np.nan))]
    for grouping in GROUPINGS:
        keep = block_mask(layers, grouping)
        raw.append((f"block-diagonal hessian ({grouping})", "hessian", grouping,
                    np.linalg.pinv(np.where(keep, hbar, 0.0), hermitian=True) @ gbar))
        raw.append((f"block-diagonal inverse ({grouping})", "inverse", grouping, np.where(keep, inverse, 0.0) @ gbar))
    return with_quality(raw, gbar, hbar, positive_definite)


def with_quality(raw: list, gbar: np.ndarray, hbar: np.ndarray, positive_definite: bool) -> list[Step]:
    """Each (name, kind, grouping, η) of `raw` as a :class:`Step` with q(η) and e = q(η)/q*; raw[0] is Newton's."""
    q_star = quadratic_model(raw[0][3], gbar, hbar)
    out = []
    for name, kind, grouping, eta in raw:
        q = quadratic_model(eta, gbar, hbar) if np.all(np.isfinite(eta)) else float("nan")
        eff = q / q_star if positive_definite and q_star > 0 else float("nan")
        out.append(Step(name, kind, grouping, eta, q, eff))
    return out


@dataclass(frozen=True)
class MatrixInteractions:
    """The interaction measures of one matrix M (H̄ or H̄⁻¹)."""

    matrix: str  # "hessian" | "inverse"
    normalized: np.ndarray  # N(M)
    off_block_ratio: np.ndarray  # (len(GROUPINGS), len(PARTS))
    distance_mean: np.ndarray  # (K,)
    distance_max: np.ndarray  # (K,)
    distance_count: np.ndarray  # (K,)


@dataclass(frozen=True)
class Interactions:
    """Everything stored under interactions/ for one checkpoint."""

    matrices: list[MatrixInteractions]
    steps: list[Step]
    positive_definite: bool
    significant: np.ndarray  # (S, S) bool: off-diagonal |H̄_st| > 2 stderr_st
    significant_count: int  # unordered pairs s < t; -1 when no standard error is known (one batch)

    def matrix(self, name: str) -> MatrixInteractions:
        return next(m for m in self.matrices if m.matrix == name)

    def step(self, kind: str, grouping: str = "") -> Step:
        """The step of this kind ("newton", "cauchy", "hessian", "inverse") and grouping."""
        return next(st for st in self.steps if st.kind == kind and st.grouping == grouping)


def interactions(gbar: np.ndarray, hbar: np.ndarray, stderr: np.ndarray, inverse: np.ndarray,
                 kinds: np.ndarray, layers: np.ndarray, positive_definite: bool) -> Interactions:
    """All the measures of this module from ḡ, H̄, its standard error and H̄⁻¹."""
    mats = []
    for name, m in (("hessian", hbar), ("inverse", inverse)):
        ratios = np.array([[off_block_ratio(m, block_mask(layers, g), part_mask(kinds, p)) for p in PARTS]
                           for g in GROUPINGS])
        mean, peak, count = distance_profile(m, layers)
        mats.append(MatrixInteractions(name, normalized(m), ratios, mean, peak, count))
    off = ~np.eye(len(gbar), dtype=bool)
    known = bool(np.all(np.isfinite(stderr[off]))) if off.any() else True
    sig = off & (np.abs(hbar) > SIGNIFICANCE * np.nan_to_num(stderr, nan=np.inf))
    significant_count = int(np.triu(sig).sum()) if known else -1
    return Interactions(mats, steps(gbar, hbar, inverse, layers, positive_definite), positive_definite, sig,
                        significant_count)
