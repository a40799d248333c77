"""Partitions of the parameters into groups s = 1..S (docs/DESIGN.md §2).

A partition assigns every scalar of every trainable tensor to one group. Each
tensor carries either one group id (all its scalars in the same group) or an
integer tensor of its shape with one id per scalar. Groups are numbered in
order of first appearance in `model.parameters()` order.

kinds: `canonical` (one group per tensor), `layer` (the tensors of one module
together, e.g. weight and bias), `trivial` (one group, Cauchy's step) and
`discrete` (one group per scalar, Newton's method; tiny models only).

Each tensor has a kind (weight, bias or other: :func:`tensor_kind`, which knows
the names weights and biases go by in nn.MultiheadAttention, weight and spectral
normalisation and parametrizations) and a layer, its owning module
(:func:`owner`; a class or position token of the root module is its own layer),
on which the weight-weight, bias-bias and weight-bias split of the interaction
measures and the layer partition rest. Tensors tied under several names are
counted once, under the name ``named_parameters()`` gives them (:func:`tied`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from curvscope.errors import CurvscopeError

PARTITIONS = ("canonical", "layer", "trivial", "discrete")
DISCRETE_LIMIT = 4096  # S = P HVPs per batch: only for tiny models

Assignment = Union[int, torch.Tensor]


@dataclass(frozen=True)
class Partition:
    """Groups of scalars over the trainable tensors `tensor_names` of a model."""

    kind: str
    tensor_names: tuple[str, ...]
    assignment: tuple[Assignment, ...]  # per tensor: a group id or an int64 id tensor of its shape
    names: tuple[str, ...]  # per group
    kinds: tuple[str, ...]  # per group: "weight" | "bias" | "other"
    layers: tuple[str, ...]  # per group: owning module ("" when several)
    sizes: tuple[int, ...]  # per group: number of scalars

    @property
    def size(self) -> int:
        """S, the number of groups."""
        return len(self.names)

    def tensors_reaching(self, group: int) -> list[int]:
        """Indices of the tensors holding some group t >= `group` (the upper triangle of row `group`)."""
        return [i for i, a in enumerate(self.assignment)
                if (a if isinstance(a, int) else int(a.max())) >= group]

    def tensors_of(self, group: int) -> list[int]:
        """Indices of the tensors holding scalars of `group`."""
        return [i for i, a in enumerate(self.assignment)
                if (a == group if isinstance(a, int) else bool((a == group).any()))]

    def group_sums(self, values: list[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor:
        """out[s] + the sum of the scalars of group s in `values` (one tensor or None per parameter).

        Not for differentiation: see :meth:`group_scalars`.
        """
        out = out.clone()
        for a, v in zip(self.assignment, values):
            if v is None:
                continue
            if isinstance(a, int):
                out[a] += v.sum().to(out.dtype)
            else:
                out.index_add_(0, a.reshape(-1).to(v.device), v.reshape(-1).to(out.dtype))
        return out

    def group_scalars(self, values: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Σ of the scalars of each group in `values`, as S separate differentiable scalars.

        Each group gets its own graph node, so differentiating one of them
        backpropagates only through the tensors of that group (None: no term).
        """
        out: list[torch.Tensor | None] = [None] * self.size
        for a, v in zip(self.assignment, values):
            if v is None:
                continue
            if isinstance(a, int):
                term = [(a, v.sum())]
            else:
                ids = a.reshape(-1).to(v.device)
                vec = torch.zeros(self.size, dtype=v.dtype, device=v.device).index_add(0, ids, v.reshape(-1))
                term = [(int(s), vec[s]) for s in torch.unique(ids).tolist()]
            for s, t in term:
                previous = out[s]
                out[s] = t if previous is None else previous + t
        return out


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, tensor) of every parameter that requires a gradient, in `parameters()` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


#: Leaf names of weights and biases kept under another name: nn.MultiheadAttention's packed projections,
#: weight normalisation's magnitude and direction (``torch.nn.utils.weight_norm``), the originals that spectral
#: normalisation and pruning keep (``weight_orig``).
WEIGHT_ALIASES = ("in_proj_weight", "weight_g", "weight_v", "weight_orig")
BIAS_ALIASES = ("in_proj_bias", "bias_orig")
#: Leaf-name endings of tokens and embeddings a module owns directly (``cls_token``, ``pos_embed``,
#: ``position_embedding``, ``register_tokens``…): "other" tensors, whatever they are multiplied by.
TOKEN_ENDINGS = ("token", "tokens", "embed", "embeds", "embedding", "embeddings")
_PARAMETRIZED = ".parametrizations."  # torch.nn.utils.parametrize: <module>.parametrizations.<tensor>.original<k>


def _leaf(name: str) -> tuple[str, str]:
    """(module, tensor) of a parameter name; a parametrized tensor (``fc.parametrizations.weight.original0``)
    is named by the module and the tensor it parametrizes (``fc``, ``weight``)."""
    if name.startswith(_PARAMETRIZED[1:]) or _PARAMETRIZED in name:
        head, _, rest = ("." + name).rpartition(_PARAMETRIZED)
        return head[1:], rest.split(".", 1)[0]
    module, _, leaf = name.rpartition(".")
    return module, leaf


def is_token(name: str) -> bool:
    """Whether parameter `name` is a token or an embedding that a module owns directly (see TOKEN_ENDINGS)."""
    leaf = _leaf(name)[1].lower()
    return leaf not in ("weight", "bias") and any(leaf == e or leaf.endswith("_" + e) for e in TOKEN_ENDINGS)


def tied(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Every trainable tensor registered under several names (tied weights: a language model's output layer
    sharing its token embedding, a module used under two names): (the name it goes by here, as
    ``named_parameters()`` gives it first, and its other names)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(n)
    return [(ns[0], tuple(ns[1:])) for ns in names.values() if len(ns) > 1]


def tied_description(model: nn.Module) -> str:
    """The tied tensors of `model` in words, each alias named as the tensor it is: "lm_head.weight = wte.weight"
    (several separated by "; "), or "" when none is tied."""
    return "; ".join(f"{' = '.join(aliases)} = {name}" for name, aliases in tied(model))


def tensor_kind(name: str) -> str:
    """'weight', 'bias' or 'other' from a parameter's name.

    ``weight`` and ``bias``, and the names those go by in some modules (WEIGHT_ALIASES, BIAS_ALIASES,
    parametrized tensors), are weights and biases; everything else (LayerNorm's are its weight and bias; class
    and position tokens, ``bias_k``…) is "other".
    """
    leaf = _leaf(name)[1]
    if leaf in ("weight", *WEIGHT_ALIASES):
        return "weight"
    if leaf in ("bias", *BIAS_ALIASES):
        return "bias"
    return "other"


def owner(name: str) -> str:
    """The module that owns parameter `name` (its layer).

    '' for a weight, bias or other parameter of the root module, except a token or embedding the root owns
    directly (``cls_token``, ``pos_embed``, see :func:`is_token`), which is its own layer, named by itself; the
    module a parametrized tensor belongs to (``fc`` for ``fc.parametrizations.weight.original0``).
    """
    module = _leaf(name)[0]
    if not module and is_token(name):
        return name
    return module


def make_partition(model: nn.Module, kind: str = "canonical") -> Partition:
    """The partition `kind` (one of PARTITIONS) of `model`'s trainable tensors."""
    params = trainable(model)
    if not params:
        raise CurvscopeError("the model has no trainable parameters (none requires a gradient).")
    names = tuple(n for n, _ in params)
    if kind == "canonical":
        return Partition(kind, names, tuple(range(len(names))), names,
                         tuple(tensor_kind(n) for n in names), tuple(owner(n) for n in names),
                         tuple(p.numel() for _, p in params))
    if kind == "layer":
        layers: list[str] = []
        for n in names:
            if owner(n) not in layers:
                layers.append(owner(n))
        assignment = tuple(layers.index(owner(n)) for n in names)
        sizes = tuple(sum(p.numel() for n, p in params if owner(n) == layer) for layer in layers)
        kinds = tuple(
            tensor_kind(next(n for n in names if owner(n) == layer))
            if sum(owner(n) == layer for n in names) == 1 else "other" for layer in layers)
        return Partition(kind, names, assignment, tuple(layers), kinds, tuple(layers), sizes)
    if kind == "trivial":
        total = sum(p.numel() for _, p in params)
        return Partition(kind, names, tuple(0 for _ in names), ("all",), ("other",), ("",), (total,))
    if kind == "discrete":
        total = sum(p.numel() for _, p in params)
        if total > DISCRETE_LIMIT:
            raise CurvscopeError(f"the discrete partition needs one Hessian-vector product per scalar "
                                 f"and batch; this model has {total} scalars (limit {DISCRETE_LIMIT}).")
        scalar_ids: list[torch.Tensor] = []
        group_names: list[str] = []
        offset = 0
        for n, p in params:
            scalar_ids.append(torch.arange(offset, offset + p.numel()).reshape(p.shape))
            group_names += [f"{n}[{','.join(map(str, idx))}]" for idx in _indices(p.shape)]
            offset += p.numel()
        kinds = tuple(tensor_kind(n) for n, p in params for _ in range(p.numel()))
        scalar_layers = tuple(owner(n) for n, p in params for _ in range(p.numel()))
        return Partition(kind, names, tuple(scalar_ids), tuple(group_names), kinds, scalar_layers,
                         tuple(1 for _ in range(total)))
    raise CurvscopeError(f"unknown partition {kind!r}: choose one of {', '.join(PARTITIONS)}.")


def _indices(shape: torch.Size) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(d) for d in shape)))
