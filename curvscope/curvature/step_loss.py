"""The actual loss after a per-group step, to check the quadratic model q(η) against reality."""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from curvscope.curvature.objective import Batch, Objective, OutputKey
from curvscope.curvature.operator import full_gradient
from curvscope.curvature.partition import Partition, make_partition, trainable
from curvscope.curvature.ranks import all_sum_array
from curvscope.sources.losses import LossFn


def loss_after_steps(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], partition: str | Partition,
                     learning_rates: Sequence[np.ndarray], *, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None,
                     gradient: tuple[list[torch.Tensor], float] | None = None, output_key: OutputKey = None,
                     batchnorm: str = "eval") -> tuple[float, np.ndarray]:
    """L(θ) and L(θ − Σ_s η_s U_s) for each η in `learning_rates`, with u = g = ∇L(θ) (eval mode).

    The model is copied; the caller's weights are never changed. A step whose
    loss is not finite gives inf (the quadratic model failed badly there).
    `gradient` = (g, L(θ)) when already computed (float64, on the model's device), else computed here.
    `output_key` and `batchnorm` are the objective's (see :class:`curvscope.curvature.objective.Objective`).
    """
    model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    obj = Objective.create(model, loss_fn, batches, output_key=output_key, batchnorm=batchnorm)
    part = partition if isinstance(partition, Partition) else make_partition(model, partition)
    params = [p for _, p in trainable(model)]
    u, loss0 = gradient if gradient is not None else full_gradient(obj, params)
    start = [p.detach().clone() for p in params]
    out = []
    for eta in learning_rates:
        eta_t = torch.as_tensor(np.asarray(eta, dtype=np.float64), device=params[0].device)
        with torch.no_grad():
            for p, p0, g, a in zip(params, start, u, part.assignment):
                rate = eta_t[a] if isinstance(a, int) else eta_t[a.to(eta_t.device)]
                p.copy_((p0.to(torch.float64) - rate * g).to(p.dtype))
            total = sum(w * float(obj.batch_loss(b, finite=False)) for b, w in enumerate(obj.weights))
        total = float(all_sum_array([total])[0])
        out.append(total if np.isfinite(total) else np.inf)
    return loss0, np.asarray(out)
