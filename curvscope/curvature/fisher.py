"""The empirical Fisher F = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ (uncentred), with ℓ_n the loss of sample n alone.

ℓ_n = loss_fn(z_n[None], y_n[None]), the batch-mean loss of a batch of one.
Per batch, F_b = (1/n_b) Σ_{n∈b} ∇ℓ_n∇ℓ_nᵀ = J_ℓᵀ (I/n_b) J_ℓ with J_ℓ = ∂ℓ/∂θ the
Jacobian of the vector of the batch's per-sample losses, so that
F = Σ_b (n_b/N) F_b. F is positive semi-definite; its projection is
F̄_b = (1/n_b) Σ_n a_n a_nᵀ with a_{n,s} = U_sᵀ∇ℓ_n, the directional derivative
of ℓ_n along U_s.

The per-sample loss vector is formed generically by ``torch.func.vmap`` of
the loss over the samples (z_n, y_n); a loss that vmap cannot batch (or
that batches to other values) is evaluated sample by sample instead. The
model's outputs and the targets must have the samples along dimension 0.

Everything else (projections F̄ by forward mode or double-vjp, products, kept
graphs) is :class:`curvscope.curvature.gauss_newton.OutputSpaceOperator`.
"""
from __future__ import annotations

from typing import cast

import torch
from torch.func import vmap

from curvscope.curvature.gauss_newton import BatchFunction, OutputSpaceOperator
from curvscope.curvature.kinds import KINDS
from curvscope.errors import CurvscopeError, summary


class FisherOperator(OutputSpaceOperator):
    """F = Σ_b w_b J_ℓᵀ (I/n_b) J_ℓ: f_b = the per-sample losses (ℓ_n)_{n∈b}, Q_b = I/n_b."""

    kind = KINDS["fisher"]
    values_are_losses = True
    _vmapped: bool | None = None  # whether the loss is evaluated per sample by vmap (None: not yet tried)

    def per_sample_losses(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(ℓ_n)_n = (loss_fn(z_n[None], y_n[None]))_n, a vector with one loss per sample."""
        if z.dim() == 0 or y.dim() == 0 or z.shape[0] != y.shape[0]:
            raise CurvscopeError(f"the empirical Fisher needs outputs and targets with the samples along "
                                 f"dimension 0; they have shapes {tuple(z.shape)} and {tuple(y.shape)}.")
        loss_fn = self.obj.loss_fn
        if self._vmapped is None:  # decided by batch_function on plain tensors; here only for a direct call
            self._vmapped = self._vmap_agrees(z.detach(), y)
        if self._vmapped:
            return vmap(lambda zn, yn: loss_fn(zn[None], yn[None]))(z, y)
        return torch.stack([loss_fn(z[n:n + 1], y[n:n + 1]) for n in range(z.shape[0])])

    def _vmap_agrees(self, z: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether vmap over the samples gives the loss of each sample alone (tried once, on real outputs)."""
        loss_fn = self.obj.loss_fn
        with torch.no_grad():
            try:
                looped = torch.stack([loss_fn(z[n:n + 1], y[n:n + 1]) for n in range(z.shape[0])])
            except Exception as exc:  # noqa: BLE001 - the loss is the user's code
                raise CurvscopeError(f"the loss cannot be evaluated on one sample: {summary(exc)}") from None
            if looped.dim() != 1:
                raise CurvscopeError(f"the loss must return a scalar (a batch mean); on one sample it returned "
                                     f"shape {tuple(looped.shape[1:])}.")
            try:
                batched = vmap(lambda zn, yn: loss_fn(zn[None], yn[None]))(z, y)
            except Exception:  # noqa: BLE001 - no batching rule for some operation of the loss
                return False
        return batched.shape == looped.shape and bool(torch.allclose(batched, looped, rtol=1e-5, atol=0.0))

    def batch_function(self, b: int) -> BatchFunction:
        """θ ↦ ℓ = (ℓ_n)_{n∈b}, the per-sample losses of batch b."""
        outputs = self.functional_model(b)
        y = self.obj.place(self.obj.batches[b][1])
        if self._vmapped is None:  # decide once, on plain tensors (not inside a forward-mode transform)
            with torch.no_grad():
                z = outputs([p.detach() for p in self.params])
            self.per_sample_losses(z, y)
        return lambda params: self.per_sample_losses(outputs(params), y)

    def output_state(self, b: int, value: torch.Tensor) -> int:
        """n_b (Q_b = I/n_b)."""
        return int(value.shape[0])

    def output_product(self, state: object, vectors: torch.Tensor) -> torch.Tensor:
        """V / n_b."""
        return vectors / cast(int, state)
