"""Hessian-vector products over the analysis set, for the whole model or one diagonal block.

H v with H = ∇²L, L = Σ_b (n_b/N) L_b, computed reverse-over-reverse (double
backward, exact through LayerNorm where forward-over-reverse is not, see
DESIGN.md §2). A *block* is a set of parameter tensors B; its operator is
v_B ↦ H_BB v_B = ∂/∂θ_B (∇_B L · v_B), differentiated with respect to θ_B only.

When the analysis set's double-backward graphs fit `max_memory`, they are
built once and reused by every product (``cached``); otherwise each product
recomputes them batch by batch (``streamed``). The memory of one batch's graph
is measured, not guessed, by counting the bytes autograd saves for it.

Vectors are flat float64 tensors on the model's device, laid out tensor after
tensor in `model.parameters()` order.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from curvscope.curvature.objective import Batch, Objective, Progress, no_progress
from curvscope.curvature.partition import owner, trainable
from curvscope.errors import CurvscopeError
from curvscope.sources.losses import LossFn

DEFAULT_MAX_MEMORY = 2 * 1024 ** 3
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_memory(text: str) -> int:
    """Bytes in a size such as '512M', '2G', '1.5GiB' or '1000000'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise CurvscopeError(f"cannot read the memory size {text!r}: write e.g. 512M, 2G or 1.5GiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass
class BlockOperator:
    """v ↦ H_BB v for the block B of tensors `indices` (float64 vectors of length `dim`)."""

    products: "HessianProducts"
    indices: list[int]
    names: list[str]
    dim: int

    def matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H_BB v in float64 (v rounded to the model's dtype), written into `out` when given."""
        return self.products.block_product(self.indices, v, out)

    def __call__(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.matvec(v, out)

    @property
    def device(self) -> torch.device:
        return self.products.device


@dataclass
class HessianProducts:
    """The analysis set, the model in eval mode and (when they fit) the kept double-backward graphs."""

    obj: Objective
    params: list[torch.Tensor]
    names: list[str]
    mode: str  # "cached" | "streamed"
    graph_bytes: int  # measured (cached) or estimated (streamed) memory of all the graphs
    count: int = 0  # Hessian-vector products made (each is one pass over the analysis set)
    _graphs: list[list[torch.Tensor]] = field(default_factory=list)
    _was_training: bool = False

    @classmethod
    def create(cls, model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *,
               max_memory: int = DEFAULT_MAX_MEMORY, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, progress: Progress = no_progress) -> "HessianProducts":
        """Prepare products on `model` (copied when `device` or `dtype` changes it)."""
        if device is not None or dtype is not None:
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        obj = Objective.create(model, loss_fn, batches)
        named = trainable(model)
        params = [p for _, p in named]
        first, nbytes = _measured_graph(obj, params)
        total = int(nbytes * obj.n_samples / max(int(obj.batches[0][0].shape[0]), 1))
        mode = "cached" if total <= max_memory else "streamed"
        hp = cls(obj, params, [n for n, _ in named], mode, total, _was_training=was_training)
        if mode == "cached":
            hp._graphs = [first]
            for b in range(1, len(obj.batches)):
                hp._graphs.append(obj.gradient_with_graph(b, params))
                progress("graphs", b + 1, len(obj.batches))
        return hp

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def close(self) -> None:
        """Free the kept graphs and give the model back its training mode."""
        self._graphs = []
        self.obj.model.train(self._was_training)

    def __enter__(self) -> "HessianProducts":
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
        """H_BB v for the tensors `indices`, accumulated in float64 over the batches, into `out` when
        given (a new vector of a large model's size costs page faults)."""
        chunks, start = [], 0
        for i in indices:
            p = self.params[i]
            chunks.append(v[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        out = torch.zeros_like(v, dtype=torch.float64) if out is None else out.zero_()
        for b, w in enumerate(self.obj.weights):
            grads = self._graphs[b] if self.mode == "cached" else self.obj.gradient_with_graph(b, self.params)
            outs = [grads[i] for i in indices]
            if not any(o.requires_grad for o in outs):
                continue  # the loss is linear in this block
            hv = torch.autograd.grad(outs, [self.params[i] for i in indices], grad_outputs=chunks,
                                     retain_graph=self.mode == "cached", allow_unused=True)
            start = 0
            for h, c in zip(hv, chunks):
                if h is not None:
                    out[start:start + c.numel()].add_(h.reshape(-1), alpha=w)
                start += c.numel()
        self.count += 1
        return out


def _measured_graph(obj: Objective, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """∇L_0 with its graph for batch 0, and the bytes autograd saved to build it."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grads = obj.gradient_with_graph(0, params)
    return grads, sum(seen.values())
