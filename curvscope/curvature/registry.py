"""Every curvature's operator, by name: adding a curvature is its module plus one line here (and in kinds.py)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from curvscope.curvature.defaults import DEFAULT_MAX_MEMORY
from curvscope.curvature.fisher import FisherOperator
from curvscope.curvature.ggn import GGNOperator
from curvscope.curvature.hessian import HessianOperator
from curvscope.curvature.kinds import KINDS
from curvscope.curvature.objective import Batch, Progress, no_progress
from curvscope.curvature.operator import CurvatureOperator
from curvscope.errors import CurvscopeError
from curvscope.sources.losses import LossFn

OPERATORS: dict[str, type[CurvatureOperator]] = {op.kind.name: op for op in (
    HessianOperator,
    GGNOperator,
    FisherOperator,
)}


def operator_class(name: str) -> type[CurvatureOperator]:
    """The operator of the curvature called `name` ("hessian", "ggn" or "fisher")."""
    if name not in OPERATORS:
        raise CurvscopeError(f"unknown curvature {name!r}: choose one of {', '.join(KINDS)}.")
    return OPERATORS[name]


def curvature_operator(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], curvature: str = "hessian", *,
                       max_memory: int = DEFAULT_MAX_MEMORY, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, progress: Progress = no_progress) -> CurvatureOperator:
    """The operator of `curvature` (H, G or F) over the analysis set `batches`, built once.

    It gives products with one vector or several (``op.operator(group).matvec``,
    ``.matmat``), blocks (``op.operator("fc1")``), the S×S projection
    (``op.projection(partition)``), and :func:`curvscope.eigenvalues`,
    :func:`curvscope.trace` and :func:`curvscope.spectral_density` accept it in
    place of (model, loss_fn, batches), sharing its kept graphs. Use it as a
    context manager (or call ``close()``) to free them and restore the model's mode.
    """
    return operator_class(curvature).create(model, loss_fn, batches, max_memory=max_memory, device=device,
                                            dtype=dtype, progress=progress)
