"""The generalised Gauss-Newton matrix G = Σ_b (n_b/N) J_bᵀ (∇²_z L_b) J_b, with z = the model's outputs.

J_b = ∂z/∂θ on batch b (all its samples) and ∇²_z L_b the Hessian of the
batch-mean loss with respect to the outputs, obtained by autograd on
``loss_fn(z, y)`` (so built-in and plug-in losses alike work). G is the
Hessian with the second derivatives of the model dropped: G = H for a model
linear in its parameters, and G is positive semi-definite for a convex loss.

Convention: z is whatever the model returns, with one exception. A model
that ends in ``log_softmax`` used with the NLL loss (the paper's networks) would
have a loss linear in z, hence ∇²_z L_b = 0 and G = 0. There the output
Hessian is taken of the cross-entropy of z instead, which has the same value
on log-probabilities (log_softmax is idempotent) and whose Hessian
diag(p) − ppᵀ (p = exp z) makes Jᵀ(diag(p) − ppᵀ)J equal to the GGN with
respect to the logits a, since ∂z/∂a = I − 1pᵀ and (I − p1ᵀ)(diag(p) − ppᵀ)(I − 1pᵀ)
= diag(p) − ppᵀ. That is the softmax GGN users expect of a classifier, and
what curvlinops computes for such a model with CrossEntropyLoss. NLL on
outputs that are not log-probabilities keeps its own (zero) output Hessian.

Everything else (projections Ḡ = UᵀGU by forward mode or double-vjp, products,
kept graphs) is :class:`curvscope.curvature.gauss_newton.OutputSpaceOperator`.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from curvscope.curvature.gauss_newton import BatchFunction, OutputSpaceOperator
from curvscope.curvature.kinds import KINDS
from curvscope.errors import CurvscopeError, summary
from curvscope.sources.losses import NLL_LOSSES, class_dim, cross_entropy


def _log_probabilities(z: torch.Tensor, dim: int = 1) -> bool:
    """Whether class scores z (batch × classes, or with positions, the classes along `dim`) are log-probabilities
    everywhere: logsumexp = 0."""
    if z.dim() < 2:
        return False
    with torch.no_grad():
        return bool((torch.logsumexp(z, dim=dim).abs() <= 100 * torch.finfo(z.dtype).eps).all())


class GGNOperator(OutputSpaceOperator):
    """G = Σ_b w_b J_bᵀ Λ_b J_b: f_b = the model's outputs z, Q_b = Λ_b = ∇²_z L_b(z)."""

    kind = KINDS["ggn"]

    def batch_function(self, b: int) -> BatchFunction:
        """θ ↦ z = model(x_b)."""
        return self.functional_model(b)

    def output_state(self, b: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(z, ∇_z L_b with its graph) at z = `value`, to apply Λ_b = ∇²_z L_b; None when Λ_b = 0 (the loss is
        linear in z, e.g. NLL on log-probabilities)."""
        _, y = self.obj.batches[b]
        z = value.detach().requires_grad_(True)
        loss_fn, y = self.obj.loss_fn, self.obj.place(y)
        if loss_fn in NLL_LOSSES and _log_probabilities(z, class_dim(z, y)):
            loss_fn = F.cross_entropy if loss_fn is F.nll_loss else cross_entropy  # the same value; the softmax's
            # curvature (see the module docstring)
        with torch.enable_grad():
            try:
                loss = loss_fn(z, y)
            except Exception as exc:  # noqa: BLE001 - the loss is the user's code
                raise CurvscopeError(f"the loss cannot be evaluated on batch {b}'s outputs: {summary(exc)}") from None
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise CurvscopeError("the loss must return a scalar tensor (a batch mean).")
            if not bool(torch.isfinite(loss.detach())):
                raise CurvscopeError(f"the loss is {float(loss.detach())} on batch {b}: the {self.title} is undefined "
                                     f"there (check the weights and the data for NaN, Inf or overflow).")
            if not loss.requires_grad:
                return None
            (g,) = torch.autograd.grad(loss, z, create_graph=True)
        return (z, g) if g.requires_grad else None

    def output_product(self, state: object, vectors: torch.Tensor) -> torch.Tensor | None:
        """Λ_b V for k vectors (k × z's shape) by one batched double backward on the output graph (a loop over
        the vectors where the loss has no batching rule)."""
        if state is None:
            return None
        z, g = cast(tuple[torch.Tensor, torch.Tensor], state)
        vectors = vectors.to(z.dtype)
        if vectors.shape[0] == 1:  # one product: a plain double backward
            (hv,) = torch.autograd.grad(g, z, grad_outputs=vectors[0], retain_graph=True, allow_unused=True)
            return None if hv is None else hv.unsqueeze(0)
        try:
            (hv,) = torch.autograd.grad(g, z, grad_outputs=vectors, is_grads_batched=True, retain_graph=True,
                                        allow_unused=True)
        except RuntimeError:
            rows = [torch.autograd.grad(g, z, grad_outputs=v, retain_graph=True, allow_unused=True)[0]
                    for v in vectors]
            if all(r is None for r in rows):
                return None
            hv = torch.stack([torch.zeros_like(z) if r is None else r for r in rows])
        return hv
