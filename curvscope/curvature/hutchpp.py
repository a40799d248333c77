"""Hutch++ trace estimation (Meyer, Musco, Musco and Woodruff, SOSA 2021), for a whole operator and, from the
same products, for every diagonal block of it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from curvscope.curvature.lanczos import MatVec, random_start


@dataclass(frozen=True)
class SharedTraces:
    """tr(C) by Hutch++ and, from the same products, the trace of every diagonal block C_BB (see :func:`hutchpp_parts`).

    `deflated` (P,) is each part's exactly computed share; `terms` (s, P) each part's Hutchinson term per probe
    (zero rows when exact). A block made of several parts adds their columns, so blocks of any grouping share
    the products.
    """

    value: float  # tr(C)
    stderr: float  # the bound sqrt(2‖A‖_F²/s) on the Hutchinson part of tr(C) (0 when exact)
    exact: bool  # n <= matvecs: every trace summed over unit vectors
    products: int  # products with C made
    deflated: np.ndarray
    terms: np.ndarray

    def block(self, parts: Sequence[int]) -> tuple[float, float]:
        """tr(C_BB) and its standard error for the block B made of `parts`: the sample standard deviation of its
        s per-probe terms over √s (0 when exact)."""
        idx = list(parts)
        per_probe = self.terms[:, idx].sum(1)
        value = float(self.deflated[idx].sum() + per_probe.mean())
        if self.exact:
            return value, 0.0
        return value, float(per_probe.std(ddof=1) / math.sqrt(len(per_probe)))


def _part_sums(v: torch.Tensor, sizes: list[int]) -> np.ndarray:
    """Σ of v over each part (consecutive ranges of `sizes` scalars)."""
    return torch.stack([part.sum() for part in torch.split(v, sizes)]).cpu().numpy()


def _into(matvec: MatVec, v: torch.Tensor, out: torch.Tensor) -> None:
    """out ← C v (a matvec may ignore `out` and return a new vector)."""
    product = matvec(v, out)
    if product.data_ptr() != out.data_ptr():
        out.copy_(product)


def _orthonormalise(rows: torch.Tensor) -> int:
    """Orthonormalise `rows` in place (classical Gram-Schmidt, twice), moving to the front those not in the span
    of the rows before them; how many there are. No second copy of the rows is made."""
    kept = 0
    for i in range(rows.shape[0]):
        v = rows[i]
        size = float(torch.linalg.vector_norm(v))
        for _ in range(2 if kept else 0):
            v.addmv_(rows[:kept].T, rows[:kept] @ v, alpha=-1)
        norm = float(torch.linalg.vector_norm(v))
        if norm <= 1e-12 * size or norm == 0.0:
            continue  # C Z has lower rank than s: this column adds nothing
        v.div_(norm)
        if kept != i:
            rows[kept].copy_(v)
        kept += 1
    return kept


def hutchpp_memory(n: int, matvecs: int) -> int:
    """Bytes of float64 vectors :func:`hutchpp_parts` (and :func:`hutchpp`) hold at once for an operator of size
    n: the sketch of s = max(⌊matvecs/3⌋, 2) vectors (Q formed in its place) and 4 more; n unit vectors' worth
    when n <= matvecs (the exact trace)."""
    if n <= matvecs:
        return 8 * n * (n + 1)
    return 8 * n * (max(matvecs // 3, 2) + 4)


def hutchpp_parts(matvec: MatVec, n: int, matvecs: int, sizes: Sequence[int], *, generator: torch.Generator,
                  device: torch.device) -> SharedTraces:
    """tr(C) by Hutch++ and tr(C_BB) of every part B (consecutive ranges of `sizes` scalars) from the same products.

    Hutch++ with s = max(⌊matvecs/3⌋, 2): Q spans C Z for s Rademacher columns Z, and
    tr(C) = tr(QᵀCQ) + E_g[gᵀÂg], Â = (I−QQᵀ)C(I−QQᵀ), estimated with s more Rademacher g (3s
    products: C Z, C Q, C ĝ with ĝ = (I−QQᵀ)g). Memory: s + 4 vectors of n entries (Q is formed in the
    sketch's place). With P_B the coordinate projection on B,
    C = QQᵀC + (I−QQᵀ)CQQᵀ + Â gives, for every B at once and without another product,

        tr(C_BB) = Σ_i q_iBᵀ(Cq_i + r_i)_B + E_g[g_Bᵀ(Âg)_B],   r_i = (I−QQᵀ)Cq_i,  Âg = (I−QQᵀ)Cĝ:

    an exact part (the block's share of the deflated top of the spectrum) and an unbiased Hutchinson
    part (the cross terms of g_B with the other blocks' g vanish in expectation). The parts' traces
    add up to the whole-model estimate (the r_i terms sum to zero over all parts), which is computed
    as :func:`hutchpp` computes it. With n <= matvecs, n products with unit vectors give every trace exactly.
    """
    sizes = [int(d) for d in sizes]
    if sum(sizes) != n:
        raise ValueError(f"the parts hold {sum(sizes)} scalars, the operator {n}")
    if n <= matvecs:
        eye = torch.eye(n, dtype=torch.float64, device=device)
        diag = torch.stack([matvec(eye[i])[i] for i in range(n)])
        value = float(sum(float(d) for d in diag))
        return SharedTraces(value, 0.0, True, n, _part_sums(diag, sizes), np.zeros((1, len(sizes))))
    s = max(matvecs // 3, 2)
    q = torch.empty(s, n, dtype=torch.float64, device=device)  # the sketch C Z, then Q's rows in its place
    for i in range(s):
        _into(matvec, random_start(n, generator, device, rademacher=True), q[i])
    q = q[:_orthonormalise(q)]
    w = torch.empty(n, dtype=torch.float64, device=device)  # every later product goes here
    low_rank, deflated = 0.0, np.zeros(len(sizes))
    for i in range(q.shape[0]):
        _into(matvec, q[i], w)
        low_rank += float(q[i] @ w)
        coef = q @ w
        w.mul_(2).addmv_(q.T, coef, alpha=-1)  # Cq_i + r_i = 2Cq_i − QᵀQCq_i
        deflated += _part_sums(q[i] * w, sizes)
    terms, frob, per_part = [], [], []
    for _ in range(s):
        g = random_start(n, generator, device, rademacher=True)
        g_hat = g - q.T @ (q @ g)
        _into(matvec, g_hat, w)
        terms.append(float(g_hat @ w))
        del g_hat
        w.addmv_(q.T, q @ w, alpha=-1)  # a = (I − QQᵀ) C ĝ
        frob.append(float(torch.linalg.vector_norm(w) ** 2))
        per_part.append(_part_sums(g.mul_(w), sizes))
    # Var(gᵀAg) = 2(‖A‖_F² − Σ A_ii²) <= 2‖A‖_F² for Rademacher g, and ‖A g‖² estimates ‖A‖_F²: a
    # conservative standard error for the whole model that, unlike the sample variance of s terms, is
    # not itself noisy when s is small.
    return SharedTraces(low_rank + sum(terms) / s, math.sqrt(2 * sum(frob) / s / s), False, 3 * s, deflated,
                        np.stack(per_part))


def hutchpp(matvec: MatVec, n: int, matvecs: int, *, generator: torch.Generator,
            device: torch.device) -> tuple[float, float, bool]:
    """tr(H) ≈ tr(QᵀHQ) + (1/s) Σ_i g_iᵀ(I−QQᵀ)H(I−QQᵀ)g_i with s = ⌊matvecs/3⌋ Rademacher probes.

    Q spans H S for s Rademacher columns S (the top of the spectrum, traced
    exactly); Hutchinson's estimator handles the deflated rest. Returns the
    estimate, its standard error (the bound sqrt(2‖A‖_F²/s) on the Hutchinson
    part, A the deflated operator; 0 when exact) and whether it is exact: with
    n <= matvecs the trace is summed over the n unit vectors instead.
    """
    res = hutchpp_parts(matvec, n, matvecs, [n], generator=generator, device=device)
    return res.value, res.stderr, res.exact
