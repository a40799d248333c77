"""Batch-mean losses by name: `loss_fn(outputs, targets) -> scalar`.

**Class scores and sequences.** ``cross_entropy`` and ``nll`` take class scores
(logits, or log-probabilities for ``nll``) with integer targets in torch's
layout, (B, C) with (B,) or (B, C, d1, …) with (B, d1, …), and also in the
layout of sequence models, (B, T, V) logits with (B, T) targets (any number of
position dimensions before the last, class, one): when the shapes fit only the
sequence reading, the classes are moved to dimension 1 (:func:`class_scores`).
When both readings fit (T = V), torch's is taken.

**Ignored targets.** Targets equal to ``IGNORE_INDEX`` (-100, torch's default)
count for nothing: the loss is the mean over the other targets, torch's
default, formed as their sum over their number. A batch (or, for the Fisher, a
sample) with no counted target has loss 0 rather than torch's 0/0 = NaN, so
that padding-only samples are allowed and contribute no gradient.

**What that means for curvature.** L_b, the mean over the batch's counted
targets, is what the Hessian and the GGN differentiate, so H̄ and Ḡ are exact
whatever the padding. The Fisher's ℓ_n is the loss of sample n alone, the mean
over *its own* counted targets (docs/DESIGN.md §2). When samples count
different numbers of targets, (1/n_b) Σ_n ℓ_n is not L_b (the batch mean
weights each target equally, the mean of per-sample means each sample
equally), and F is the second moment of the gradients of those per-sample
means: curvscope does not reweight them. With no ignored target and equal
lengths the two agree. Across batches, L = Σ_b (n_b/N) L_b weights batches by
their samples, not by their counted targets.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from curvscope.errors import CurvscopeError
from curvscope.sources.plugins import call_plugin

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE_INDEX = -100


def class_dim(outputs: torch.Tensor, targets: torch.Tensor) -> int:
    """The dimension of `outputs` that holds the classes for integer `targets`: the last one when the shapes fit
    only the sequence layout (B, T…, V) with targets (B, T…), else 1 (torch's layout)."""
    if (outputs.dim() >= 3 and not targets.is_floating_point() and targets.dim() == outputs.dim() - 1
            and tuple(outputs.shape[:-1]) == tuple(targets.shape)
            and tuple(outputs.shape[2:]) != tuple(targets.shape[1:])):
        return outputs.dim() - 1
    return 1


def class_scores(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`outputs` with the classes along dimension 1 (torch's layout), moved there from the last dimension when
    :func:`class_dim` says so."""
    dim = class_dim(outputs, targets)
    return outputs if dim == 1 else outputs.movedim(dim, 1)


def counted(targets: torch.Tensor) -> torch.Tensor:
    """How many of the integer `targets` are not ``IGNORE_INDEX`` (a 0-dimensional integer tensor)."""
    return (targets != IGNORE_INDEX).sum()


def _mean_over_counted(pointwise: Callable[..., torch.Tensor], outputs: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
    """Σ over the counted targets of `pointwise`'s loss / their number (0 when none counts); soft (floating)
    targets go to torch unchanged."""
    if targets.is_floating_point():
        return pointwise(outputs, targets)
    total = pointwise(class_scores(outputs, targets), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / counted(targets).clamp(min=1).to(total.dtype)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (or log-probabilities: the same value), mean over the targets that are not
    ``IGNORE_INDEX``; (B, C…) or sequence (B, T, V) layouts (see the module docstring)."""
    return _mean_over_counted(F.cross_entropy, outputs, targets)


def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of log-probabilities (log-softmax outputs, as in the paper), mean over the targets
    that are not ``IGNORE_INDEX``; (B, C…) or sequence (B, T, V) layouts (see the module docstring)."""
    return _mean_over_counted(F.nll_loss, outputs, targets)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; integer class targets are compared as one-hot vectors."""
    if not targets.is_floating_point() and outputs.dim() == 2 and targets.dim() == 1:
        targets = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,  # on logits (or log-probabilities: same value)
    "nll": nll,  # on log-softmax outputs, as in the paper
    "mse": mse,
}
#: The built-in NLL and the torch function it wraps: the GGN takes the softmax's curvature for both.
NLL_LOSSES: tuple[LossFn, ...] = (nll, F.nll_loss)


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
