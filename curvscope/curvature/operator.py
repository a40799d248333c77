"""A curvature matrix C of the loss over an analysis set, as an operator: the interface every curvature shares.

Each curvature is the weighted sum of per-batch matrices, C = Σ_b (n_b/N) C_b,
with C_b the curvature of the batch-mean loss L_b (so that results do not
depend on how the set is cut into batches). A :class:`CurvatureOperator` is
built once over the analysis set and then gives

- products C_BB v of a block B (a set of parameter tensors; the whole model, one
  tensor, one layer) with one vector (:meth:`CurvatureOperator.block_product`,
  or the :class:`BlockOperator` of :meth:`CurvatureOperator.operator`) or with
  several (:meth:`BlockOperator.matmat`);
- the S×S projection C̄ = UᵀCU on a partition (:meth:`CurvatureOperator.projection`),
  with U_s the full-data gradient restricted to group s, and its standard error
  across batches;

and the spectral estimators (``curvscope.curvature.spectrum``) accept it, so
that several of them share one build. A new curvature is a subclass that says
how to multiply one batch's matrix by a vector (:meth:`batch_product`) and how
to project one batch's matrix (:meth:`batch_projection`), registered in
``curvscope.curvature.curvatures``.

Vectors are flat float64 tensors on the model's device, laid out tensor after
tensor in ``model.parameters()`` order (trainable tensors only).
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from curvscope.curvature import ranks
from curvscope.curvature.defaults import DEFAULT_MAX_MEMORY
from curvscope.curvature.kinds import CurvatureKind
from curvscope.curvature.moments import WeightedMoments
from curvscope.curvature.objective import Batch, Objective, Progress, differentiate, no_progress, reported
from curvscope.curvature.partition import Partition, owner, trainable
from curvscope.errors import CurvscopeError
from curvscope.results import PseudoHessianResult
from curvscope.sources.losses import LossFn


@dataclass
class BlockOperator:
    """v ↦ C_BB v for the block B of tensors `indices` (float64 vectors of length `dim`)."""

    curvature: "CurvatureOperator"
    indices: list[int]
    names: list[str]
    dim: int

    def matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """C_BB v in float64 (v rounded to the model's dtype), written into `out` when given."""
        return self.curvature.block_product(self.indices, v, out)

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """C_BB V for the columns of V (dim × k), as a float64 dim × k matrix."""
        if vectors.dim() != 2 or vectors.shape[0] != self.dim:
            raise CurvscopeError(f"matmat needs a {self.dim} × k matrix, not one of shape {tuple(vectors.shape)}.")
        return torch.stack([self.matvec(vectors[:, j]) for j in range(vectors.shape[1])], 1)

    def __call__(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.matvec(v, out)

    @property
    def device(self) -> torch.device:
        return self.curvature.device


def full_gradient(obj: Objective, params: Sequence[torch.Tensor], progress: Progress = no_progress,
                  ) -> tuple[list[torch.Tensor], float]:
    """g = ∇L(θ) in float64 (one tensor per parameter) and L(θ), in one pass over the batches."""
    grad = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    loss = 0.0
    for b in reported(progress, "gradient", len(obj.weights)):
        w = obj.weights[b]
        value = obj.batch_loss(b)
        for acc, g in zip(grad, differentiate(value, params, allow_unused=True)):
            if g is not None:
                acc.add_(g.to(torch.float64), alpha=w)
        loss += w * float(value.detach())
    ranks.all_sum_tensors(grad)
    return grad, float(ranks.all_sum_array([loss])[0])


def saved_bytes() -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[int, int]]:
    """A pack hook for ``torch.autograd.graph.saved_tensors_hooks`` recording the storages autograd saves
    (bytes by storage pointer): the measured memory of a graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    return pack, seen


class CurvatureOperator(ABC):
    """C = Σ_b (n_b/N) C_b over an analysis set, for a model in eval mode (see the module docstring)."""

    kind: ClassVar[CurvatureKind]  # name (registry key, `curvature` attribute), symbol and title
    method: ClassVar[str]  # how its projection is computed, recorded as the results file's `strategy`

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def title(self) -> str:
        return self.kind.title

    def __init__(self, obj: Objective, params: list[torch.Tensor], names: list[str], *, was_training: bool = False,
                 max_memory: int = DEFAULT_MAX_MEMORY, progress: Progress = no_progress) -> None:
        self.obj, self.params, self.names = obj, params, names
        self.max_memory, self.progress = max_memory, progress
        self.count = 0  # curvature-vector products made (each is one pass over the analysis set)
        self.mode = "streamed"  # "cached" once per-batch state is kept for the products
        self.graph_bytes = 0  # memory of that state, measured (cached) or estimated (streamed)
        self._was_training = was_training

    @classmethod
    def create(cls, model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *,
               max_memory: int = DEFAULT_MAX_MEMORY, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, progress: Progress = no_progress) -> "CurvatureOperator":
        """The operator of `model` (copied when `device` or `dtype` changes it) on the analysis set `batches`.

        Per-batch state that speeds up products (graphs) is built on the first
        product and kept when it fits `max_memory` bytes.
        """
        if device is not None or dtype is not None:
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        obj = Objective.create(model, loss_fn, batches)
        named = trainable(model)
        return cls(obj, [p for _, p in named], [n for n, _ in named], was_training=was_training,
                   max_memory=max_memory, progress=progress)

    # --- what a curvature defines ---------------------------------------------------------------

    @abstractmethod
    def batch_product(self, b: int, indices: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """(C_b)_BB v for batch b and the block of tensors `indices`, v given per tensor (`chunks`, in the
        model's dtype); None for a tensor whose product is zero."""

    @abstractmethod
    def batch_projection(self, b: int, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition,
                         method: str | None = None) -> torch.Tensor:
        """UᵀC_bU (S × S, float64) for batch b, u the fixed direction per tensor (in the model's dtype and
        in float64), by `method` (the curvature's default when None)."""

    def projection_method(self, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition,
                          strategy: str) -> tuple[str, torch.Tensor | None]:
        """The method the projection uses (`strategy` is the Hessian's; others have one method or choose their
        own), and C̄_0 when choosing it computed C̄_0 (None otherwise)."""
        if strategy != "auto":
            raise CurvscopeError(f"--strategy {strategy} is for the Hessian; the {self.title} has one method "
                                 f"({self.method}): leave --strategy at auto.")
        return self.method, None

    # --- what every curvature gets ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def close(self) -> None:
        """Free kept state and give the model back its training mode."""
        self.release()
        self.obj.model.train(self._was_training)

    def release(self) -> None:  # noqa: B027 - a hook with nothing to do by default, not an abstract method
        """Free per-batch state kept for the products (none by default)."""

    def __enter__(self) -> "CurvatureOperator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def groups(self) -> dict[str, list[int]]:
        """Every nameable block: each tensor by name, each layer (module with several tensors) by name."""
        out = {n: [i] for i, n in enumerate(self.names)}
        for n in self.names:
            members = [j for j, m in enumerate(self.names) if owner(m) == owner(n)]
            if owner(n) and owner(n) not in out and len(members) > 1:
                out[owner(n)] = members
        return out

    def operator(self, group: str | None = None) -> BlockOperator:
        """The operator of the whole model (None), of one tensor or of one layer (weight and bias)."""
        if group is None:
            indices = list(range(len(self.params)))
        else:
            known = self.groups()
            if group not in known:
                raise CurvscopeError(f"no parameter tensor or layer is called {group!r}; the model has "
                                     f"{', '.join(known)}.")
            indices = known[group]
        return BlockOperator(self, indices, [self.names[i] for i in indices],
                             sum(self.params[i].numel() for i in indices))

    def block_product(self, indices: list[int], v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """C_BB v for the tensors `indices`, accumulated in float64 over the batches, into `out` when given
        (a new vector of a large model's size costs page faults)."""
        ranks.announce(indices, v, len(self.params))  # rank 0 leading a solver: the other ranks multiply too
        chunks, start = [], 0
        for i in indices:
            p = self.params[i]
            chunks.append(v[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        out = torch.zeros_like(v, dtype=torch.float64) if out is None else out.zero_()
        for b, w in enumerate(self.obj.weights):
            start = 0
            for h, c in zip(self.batch_product(b, indices, chunks), chunks):
                if h is not None:
                    out[start:start + c.numel()].add_(h.reshape(-1), alpha=w)
                start += c.numel()
        self.count += 1
        return ranks.combine(out)

    def projection(self, part: Partition, *, strategy: str = "auto",
                   gradient: tuple[list[torch.Tensor], float] | None = None,
                   progress: Progress = no_progress) -> PseudoHessianResult:
        """C̄ = UᵀCU and ḡ on `part`, with u = g = ∇L(θ) (computed here unless `gradient` = (g, L) is given).

        C̄ = Σ_b w_b C̄_b exactly (w_b = n_b/N); its standard error across batches
        is sqrt(B/(B−1) Σ_b w_b² (C̄_b − C̄)²), both streamed (:mod:`curvscope.curvature.moments`), so that
        memory does not grow with the number of batches. Accumulation is in float64.
        """
        u64, loss = gradient if gradient is not None else full_gradient(self.obj, self.params, progress)
        u = [g.to(p.dtype) for g, p in zip(u64, self.params)]
        chosen, first = self.projection_method(u, u64, part, strategy)
        moments = WeightedMoments()  # streamed: memory does not grow with the number of batches
        for b in reported(progress, f"pseudo-{self.kind.short}", len(self.obj.weights)):
            cb = first if b == 0 and first is not None else self.batch_projection(b, u, u64, part, chosen)
            moments.add(self.obj.weights[b], cb.cpu().numpy())
        moments = moments.summed(ranks.all_sum_array)
        cbar, stderr, B = moments.mean, moments.stderr, moments.count
        gbar = part.group_sums([g * g for g in u64], torch.zeros(part.size, dtype=torch.float64,
                                                                  device=u64[0].device)).cpu().numpy()
        if not (np.isfinite(cbar).all() and np.isfinite(gbar).all()):
            raise CurvscopeError(f"the pseudo-{self.name} or the gradient overflowed to NaN or Inf although the "
                                 f"loss is finite; try --dtype float64, or check the weights for extreme values.")
        return PseudoHessianResult(
            names=np.asarray(part.names, dtype=str), kinds=np.asarray(part.kinds, dtype=str),
            layers=np.asarray(part.layers, dtype=str), sizes=np.asarray(part.sizes, dtype=np.int64),
            partition=part.kind, pseudo_gradient=gbar, pseudo_hessian=cbar, pseudo_hessian_stderr=stderr,
            loss=loss, n_samples=self.obj.n_samples, n_batches=B, strategy=chosen, curvature=self.name)
