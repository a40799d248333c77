"""The loss over the analysis set, L(θ) = Σ_b (n_b / N) L_b(θ), batch by batch.

Every forward pass runs under PyTorch's math attention backend: the fused
scaled-dot-product attention kernels (used by ``nn.MultiheadAttention`` and
most transformer code) have no double backward, and the math backend gives
the same values with every derivative.

Batches are (inputs, targets) pairs; L_b is the batch-mean loss. Every engine
goes through :class:`Objective`, so all of them weight batches the same way and
put inputs on the model's device and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope.curvature.data_conv import data_convolutions
from curvscope.errors import CurvscopeError, summary
from curvscope.sources.losses import LossFn

Batch = tuple[torch.Tensor, torch.Tensor]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def no_progress(stage: str, done: int, total: int) -> None:
    """A progress callback that shows nothing."""


def differentiate(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                  **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad``, with a model that PyTorch cannot differentiate (twice) reported as bad input."""
    try:
        return torch.autograd.grad(outputs, inputs, **kwargs)
    except RuntimeError as exc:
        raise CurvscopeError(f"PyTorch cannot differentiate this model as curvature needs ({summary(exc)}): an "
                             f"operation it uses has no (second) derivative in this PyTorch; replace that "
                             f"operation or analyse another model.") from None


@dataclass
class Objective:
    """A model in eval mode, a batch-mean loss and the batches of the analysis set."""

    model: nn.Module
    loss_fn: LossFn
    batches: Sequence[Batch]

    @classmethod
    def create(cls, model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch]) -> "Objective":
        """Materialise `batches` (several passes are made over them) and check they are usable."""
        kept = [(x, y) for x, y in batches]
        if not kept or sum(int(x.shape[0]) for x, _ in kept) == 0:
            raise CurvscopeError("the analysis set is empty: no batch holds a sample.")
        return cls(model, loss_fn, kept)

    @property
    def n_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.batches)

    @property
    def weights(self) -> list[float]:
        """n_b / N for each batch."""
        n = self.n_samples
        return [int(x.shape[0]) / n for x, _ in self.batches]

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the model's device (and dtype, when floating point)."""
        ref = next(self.model.parameters())
        return t.to(ref.device, ref.dtype) if t.is_floating_point() else t.to(ref.device)

    def batch_loss(self, b: int, finite: bool = True) -> torch.Tensor:
        """L_b, the mean loss of batch b, differentiable in the parameters; refuses NaN or Inf unless not `finite`."""
        x, y = self.batches[b]
        try:
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                value = self.loss_fn(self.model(self.place(x)), self.place(y))
        except Exception as exc:  # noqa: BLE001 - the model and the loss are the user's code
            raise CurvscopeError(f"the model and loss cannot be evaluated on batch {b} "
                                 f"(inputs {tuple(x.shape)}, targets {tuple(y.shape)}): {summary(exc)}") from None
        if not isinstance(value, torch.Tensor):
            raise CurvscopeError(f"the loss must return a scalar tensor; it returned a {type(value).__name__}.")
        if value.dim() != 0:
            raise CurvscopeError(f"the loss must be a batch mean (a scalar); it returned shape {tuple(value.shape)}.")
        if finite and not math.isfinite(float(value.detach())):
            raise CurvscopeError(f"the loss is {float(value.detach())} on batch {b}: curvature is undefined "
                                 "there (check the weights and the data for NaN, Inf or overflow).")
        return value

    def gradient_with_graph(self, b: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """∇L_b with its graph kept for differentiating again (zeros for tensors L_b does not use).

        Convolutions of the data record a leaner graph (see data_conv); values are unchanged.
        """
        with data_convolutions(self.model):
            loss = self.batch_loss(b)
        grads = differentiate(loss, params, create_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
