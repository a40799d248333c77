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


def hutchpp_parts(matvec: MatVec, n: int, matvecs: int, sizes: Sequence[int], *, generator: torch.Generator,
                  device: torch.device) -> SharedTraces:
    """tr(C) by Hutch++ and tr(C_BB) of every part B (consecutive ranges of `sizes` scalars) from the same products.

    Hutch++ with s = max(⌊matvecs/3⌋, 2): Q spans C Z for s Rademacher columns Z, and
    tr(C) = tr(QᵀCQ) + E_g[gᵀÂg], Â = (I−QQᵀ)C(I−QQᵀ), estimated with s more Rademacher g (3s
    products: C Z, C Q, C ĝ with ĝ = (I−QQᵀ)g). With P_B the coordinate projection on B,
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
    sketch = torch.stack([matvec(random_start(n, generator, device, rademacher=True)) for _ in range(s)], 1)
    q, _ = torch.linalg.qr(sketch)
    del sketch
    low_rank, deflated = 0.0, np.zeros(len(sizes))
    for i in range(q.shape[1]):
        cq = matvec(q[:, i])
        low_rank += float(q[:, i] @ cq)
        r = cq - q @ (q.T @ cq)
        deflated += _part_sums(q[:, i] * (cq + r), sizes)
    terms, frob, per_part = [], [], []
    for _ in range(s):
        g = random_start(n, generator, device, rademacher=True)
        g_hat = g - q @ (q.T @ g)
        hg = matvec(g_hat)
        a = hg - q @ (q.T @ hg)
        terms.append(float(g_hat @ hg))
        frob.append(float(torch.linalg.vector_norm(a) ** 2))
        per_part.append(_part_sums(g * a, sizes))
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
