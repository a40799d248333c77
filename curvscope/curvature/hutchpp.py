"""Hutch++ trace estimation (Meyer, Musco, Musco and Woodruff, SOSA 2021)."""
from __future__ import annotations

import math

import torch

from curvscope.curvature.lanczos import MatVec, random_start


def hutchpp(matvec: MatVec, n: int, matvecs: int, *, generator: torch.Generator,
            device: torch.device) -> tuple[float, float, bool]:
    """tr(H) ≈ tr(QᵀHQ) + (1/s) Σ_i g_iᵀ(I−QQᵀ)H(I−QQᵀ)g_i with s = ⌊matvecs/3⌋ Rademacher probes.

    Q spans H S for s Rademacher columns S (the top of the spectrum, traced
    exactly); Hutchinson's estimator handles the deflated rest. Returns the
    estimate, its standard error (the bound sqrt(2‖A‖_F²/s) on the Hutchinson
    part, A the deflated operator; 0 when exact) and whether it is exact: with
    n <= matvecs the trace is summed over the n unit vectors instead.
    """
    if n <= matvecs:
        eye = torch.eye(n, dtype=torch.float64, device=device)
        return float(sum(float(matvec(eye[i])[i]) for i in range(n))), 0.0, True
    s = max(matvecs // 3, 2)
    sketch = torch.stack([matvec(random_start(n, generator, device, rademacher=True)) for _ in range(s)], 1)
    q, _ = torch.linalg.qr(sketch)
    low_rank = float(sum(float(q[:, i] @ matvec(q[:, i])) for i in range(q.shape[1])))
    terms, frob = [], []
    for _ in range(s):
        g = random_start(n, generator, device, rademacher=True)
        g = g - q @ (q.T @ g)
        hg = matvec(g)
        terms.append(float(g @ hg))
        frob.append(float(torch.linalg.vector_norm(hg - q @ (q.T @ hg)) ** 2))
    # Var(gᵀAg) = 2(‖A‖_F² − Σ A_ii²) <= 2‖A‖_F² for Rademacher g, A = (I−QQᵀ)H(I−QQᵀ), and
    # ‖A g‖² estimates ‖A‖_F²: a conservative standard error that, unlike the sample
    # variance of s terms, is not itself noisy when s is small.
    return low_rank + sum(terms) / s, math.sqrt(2 * sum(frob) / s / s), False
