"""The exact pseudo-Hessian H̄_st = U_sᵀ H U_t, batch by batch (DESIGN.md §2).

Pass 1: u = g = ∇L(θ) = Σ_b (n_b/N) ∇L_b over the whole analysis set, then held
fixed. Pass 2: for each batch, z_s = U_sᵀ ∇L_b (one backward with a graph),
then row s of H̄_b is the gradient of z_s dotted with each U_t, which is
U_sᵀ H_b U_t. H̄ = Σ_b (n_b/N) H̄_b exactly, whatever the batching.

Strategies for the S second backward passes per batch:
- ``triangular``: row s is differentiated only with respect to the tensors
  holding groups t >= s, and the lower triangle is filled by symmetry (fastest
  on CPU, measured in scripts/bench.py);
- ``batched``: all S rows in one vmapped backward (``is_grads_batched``);
- ``auto``: triangular on CPU; on other devices the faster of the two, timed
  on the first batch.
"""
from __future__ import annotations

import copy
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn

from curvscope.curvature.objective import Batch, Objective, Progress, no_progress
from curvscope.curvature.partition import Partition, make_partition, trainable
from curvscope.errors import CurvscopeError
from curvscope.results import PseudoHessianResult
from curvscope.sources.losses import LossFn

STRATEGIES = ("auto", "triangular", "batched")


def full_gradient(obj: Objective, params: list[torch.Tensor], progress: Progress = no_progress,
                  ) -> tuple[list[torch.Tensor], float]:
    """g = ∇L(θ) in float64 (one tensor per parameter) and L(θ), in one pass over the batches."""
    grad = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    loss = 0.0
    for b, w in enumerate(obj.weights):
        value = obj.batch_loss(b)
        for acc, g in zip(grad, torch.autograd.grad(value, params, allow_unused=True)):
            if g is not None:
                acc.add_(g.to(torch.float64), alpha=w)
        loss += w * float(value.detach())
        progress("gradient", b + 1, len(obj.batches))
    return grad, loss


def _rows_triangular(z: list[torch.Tensor | None], params: list[torch.Tensor], u64: list[torch.Tensor],
                     part: Partition) -> torch.Tensor:
    S = part.size
    out = torch.zeros(S, S, dtype=torch.float64, device=u64[0].device)
    for s in range(S):
        if z[s] is None or not z[s].requires_grad:
            continue
        idx = part.tensors_reaching(s)
        hv = torch.autograd.grad(z[s], [params[i] for i in idx], retain_graph=True, allow_unused=True)
        prods: list[torch.Tensor | None] = [None] * len(params)
        for i, h in zip(idx, hv):
            prods[i] = None if h is None else h.to(torch.float64) * u64[i]
        row = part.group_sums(prods, torch.zeros(S, dtype=torch.float64, device=u64[0].device))
        out[s, s:] = row[s:]
    return torch.triu(out) + torch.triu(out, 1).T


def _rows_batched(z: list[torch.Tensor | None], params: list[torch.Tensor], u64: list[torch.Tensor],
                  part: Partition) -> torch.Tensor:
    S = part.size
    zero = next(t for t in z if t is not None).new_zeros(())
    vec = torch.stack([zero if t is None else t for t in z])
    eye = torch.eye(S, dtype=vec.dtype, device=vec.device)
    hv = torch.autograd.grad(vec, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    rows = torch.zeros(S, S, dtype=torch.float64, device=vec.device)
    for s in range(S):
        prods = [None if h is None else h[s].to(torch.float64) * u for h, u in zip(hv, u64)]
        rows[s] = part.group_sums(prods, rows[s])
    return 0.5 * (rows + rows.T)


ROWS = {"triangular": _rows_triangular, "batched": _rows_batched}


def batch_pseudo_hessian(obj: Objective, b: int, params: list[torch.Tensor], u: list[torch.Tensor],
                         u64: list[torch.Tensor], part: Partition, strategy: str) -> torch.Tensor:
    """H̄_b = Uᵀ H_b U for batch b (float64, S x S), u held fixed."""
    grads = obj.gradient_with_graph(b, params)
    z = part.group_scalars([g * ui if g.requires_grad else None for g, ui in zip(grads, u)])
    if all(t is None for t in z):  # the loss is linear in every parameter
        return torch.zeros(part.size, part.size, dtype=torch.float64, device=u64[0].device)
    return ROWS[strategy](z, params, u64, part)


def _choose_strategy(strategy: str, obj: Objective, params: list[torch.Tensor], u: list[torch.Tensor],
                     u64: list[torch.Tensor], part: Partition) -> tuple[str, torch.Tensor | None]:
    """The strategy to use; when timing decides it, also H̄_0 (already computed)."""
    if strategy not in STRATEGIES:
        raise CurvscopeError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    if strategy != "auto":
        return strategy, None
    if params[0].device.type == "cpu":
        return "triangular", None
    timings, first = {}, None
    for name in ("triangular", "batched"):
        torch.cuda.synchronize(params[0].device) if params[0].device.type == "cuda" else None
        start = time.perf_counter()
        try:
            first = batch_pseudo_hessian(obj, 0, params, u, u64, part, name)
        except RuntimeError:  # an operator without a batching rule
            continue
        torch.cuda.synchronize(params[0].device) if params[0].device.type == "cuda" else None
        timings[name] = time.perf_counter() - start
    return min(timings, key=timings.get), first


def pseudo_hessian(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch],
                   partition: str | Partition = "canonical", *, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, strategy: str = "auto",
                   progress: Progress = no_progress) -> PseudoHessianResult:
    """ḡ and H̄ of `model` on the analysis set `batches`, for `partition`.

    ḡ_s = U_sᵀ g = ‖g_s‖² and H̄_st = U_sᵀ H U_t with u = g = ∇L(θ) over all
    batches, L(θ) = Σ_b (n_b/N) L_b(θ). The model is put in eval mode (a copy
    is made when `device` or `dtype` changes it). Accumulation is in float64.
    """
    if device is not None or dtype is not None:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        obj = Objective.create(model, loss_fn, batches)
        part = partition if isinstance(partition, Partition) else make_partition(model, partition)
        params = [p for _, p in trainable(model)]
        u64, loss = full_gradient(obj, params, progress)
        u = [g.to(p.dtype) for g, p in zip(u64, params)]
        chosen, first = _choose_strategy(strategy, obj, params, u, u64, part)
        per_batch = []
        for b in range(len(obj.batches)):
            per_batch.append(first if b == 0 and first is not None
                             else batch_pseudo_hessian(obj, b, params, u, u64, part, chosen))
            progress("pseudo-Hessian", b + 1, len(obj.batches))
    finally:
        model.train(was_training)
    w = np.asarray(obj.weights)
    stack = torch.stack(per_batch).cpu().numpy()
    hbar = np.tensordot(w, stack, axes=1)
    B = len(w)
    stderr = (np.sqrt(B / (B - 1) * np.tensordot(w ** 2, (stack - hbar) ** 2, axes=1))
              if B > 1 else np.full_like(hbar, np.nan))
    gbar = part.group_sums([g * g for g in u64], torch.zeros(part.size, dtype=torch.float64,
                                                              device=u64[0].device)).cpu().numpy()
    if not (np.isfinite(hbar).all() and np.isfinite(gbar).all()):
        raise CurvscopeError("the pseudo-Hessian or the gradient overflowed to NaN or Inf although the loss is "
                             "finite; try --dtype float64, or check the weights for extreme values.")
    return PseudoHessianResult(
        names=np.asarray(part.names, dtype=str), kinds=np.asarray(part.kinds, dtype=str),
        layers=np.asarray(part.layers, dtype=str), sizes=np.asarray(part.sizes, dtype=np.int64),
        partition=part.kind, pseudo_gradient=gbar, pseudo_hessian=hbar, pseudo_hessian_stderr=stderr,
        loss=loss, n_samples=obj.n_samples, n_batches=B, strategy=chosen)
