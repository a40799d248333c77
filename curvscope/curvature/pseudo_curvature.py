"""The pseudo-curvature C̄_st = U_sᵀ C U_t of any registered curvature, batch by batch (docs/DESIGN.md §2).

Pass 1: u = g = ∇L(θ) = Σ_b (n_b/N) ∇L_b over the whole analysis set, then held
fixed. Pass 2: each batch's C̄_b = UᵀC_bU, by the curvature's own method (see
its module); C̄ = Σ_b (n_b/N) C̄_b exactly, whatever the batching.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from curvscope.curvature.kinds import DEFAULT_CURVATURE
from curvscope.curvature.objective import Batch, Progress, no_progress
from curvscope.curvature.partition import Partition, make_partition
from curvscope.curvature.registry import operator_class
from curvscope.results import PseudoHessianResult
from curvscope.sources.losses import LossFn


def pseudo_hessian(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch],
                   partition: str | Partition = "canonical", *, curvature: str = DEFAULT_CURVATURE,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   strategy: str = "auto", progress: Progress = no_progress) -> PseudoHessianResult:
    """ḡ and C̄ of `model` on the analysis set `batches`, for `partition` and `curvature`.

    ḡ_s = U_sᵀ g = ‖g_s‖² and C̄_st = U_sᵀ C U_t with u = g = ∇L(θ) over all
    batches, L(θ) = Σ_b (n_b/N) L_b(θ), and C the Hessian H = ∇²L ("hessian"),
    the generalised Gauss-Newton matrix G ("ggn") or the empirical Fisher F
    ("fisher"). The result's `.curvature` says which. The model is put in eval
    mode and left as it was found (a copy is made when `device` or `dtype`
    changes it). Accumulation is in float64. `strategy` organises the
    Hessian's second derivatives (see ``curvscope.curvature.hessian``).
    """
    with operator_class(curvature).create(model, loss_fn, batches, device=device, dtype=dtype) as op:
        part = partition if isinstance(partition, Partition) else make_partition(op.obj.model, partition)
        return op.projection(part, strategy=strategy, progress=progress)
