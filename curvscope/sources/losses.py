"""Batch-mean losses by name: `loss_fn(outputs, targets) -> scalar`."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from curvscope.errors import CurvscopeError
from curvscope.sources.plugins import call_plugin

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; integer class targets are compared as one-hot vectors."""
    if not targets.is_floating_point() and outputs.dim() == 2 and targets.dim() == 1:
        targets = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,  # on logits (or log-probabilities: same value)
    "nll": F.nll_loss,  # on log-softmax outputs, as in the paper
    "mse": mse,
}


def build_loss(name: str) -> LossFn:
    """The batch-mean loss called `name`, or the one "package.module:function" returns when called."""
    if ":" in name:
        loss = call_plugin(name, {}, "loss")
        if not callable(loss):
            raise CurvscopeError(f"the loss plug-in {name!r} returned a {type(loss).__name__}, not a callable "
                                 f"loss_fn(outputs, targets).")
        return loss
    if name not in LOSSES:
        raise CurvscopeError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}.")
    return LOSSES[name]
