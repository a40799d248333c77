"""K-FAC: the Kronecker-factored approximation of the GGN or the Fisher, and its projection on U.

K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) makes two
approximations of a curvature C ∈ {G, F} at once: it keeps only C's layer
blocks, and it factorises each layer's block as A_l ⊗ B_l. For a layer whose
per-sample output s_{n,t} = W ã_{n,t} at positions t = 1..R (R = 1 for a
Linear on vectors; the leading non-batch dimensions of a Linear's input and
the output pixels of a Conv2d otherwise, the "expand" treatment), with the
input ã augmented by a 1 when the layer has a bias (the bias is the last
column of [W | b]):

    A_l = 1/(N R) Σ_n Σ_t ã_{n,t} ã_{n,t}ᵀ,        B_l = 1/N Σ_n Σ_t Σ_c σ_{n,c} g_{n,t,c} g_{n,t,c}ᵀ,

("expand", the default), or, with ``approximation="reduce"`` (Eschenhagen et al. 2023), the
positions are summed out first: ã_n = 1/R Σ_t ã_{n,t}, g_{n,c} = Σ_t g_{n,t,c}, and R = 1 above
(exact on a Conv2d's bias-bias block, where expand divides the cross-position terms away),

where g_{n,t,c} = J_{s_{n,t}}ᵀ v_{n,c} backpropagates a vector v_{n,c} of sample n's
output space to the layer's output, with signs σ. The flavour says which:

- ``type-2`` (for the GGN): Λ_n = n_b ∇²_{z_n} L_b = Σ_c λ_{n,c} e_{n,c} e_{n,c}ᵀ, the output Hessian
  of sample n's loss (its block of the batch's, made per-sample), in its eigenbasis:
  v_{n,c} = √|λ_{n,c}| e_{n,c}, σ_{n,c} = sign λ_{n,c}. One backward pass per output value
  (C passes for C classes), so it is refused past ``TYPE2_LIMIT`` values per sample.
- ``empirical`` (for the empirical Fisher): v_n = ∇_{z_n} ℓ_n, the per-sample losses' gradient
  (one backward pass of Σ_n ℓ_n).
- ``mc`` (the Fisher with sampled labels, for either): v_n = ∇_{z_n} ℓ(z_n, ŷ_n) with ŷ_n drawn from
  the model's predictive distribution (``mc_samples`` draws, averaged), seeded. Built-in losses only:
  ``cross_entropy`` (ŷ ~ softmax z), ``nll`` on log-probabilities (ŷ ~ exp z), ``mse``
  (ŷ = z + √(D/2) ε for D output values per sample, so that E[∇ℓ∇ℓᵀ] = ∇²ℓ = (2/D) I).

Then K = blockdiag_l (A_l ⊗ B_l), whose product with a layer's [V_W | v_b] is
B_l [V_W | v_b] A_l. A Conv2d of G groups has one pair (A, B) per group of
channels (its weight is block-diagonal over them). K-FAC is exact for a single
linear map under MSE, and for any linear layer on one sample with the empirical
flavour.

Only ``nn.Linear`` and ``nn.Conv2d`` modules that are called once per forward pass,
own their trainable weight alone (not tied) and see batched inputs have a rule.
Every other trainable tensor (LayerNorm, embeddings, "other" tensors, modules
called twice) is kept exact: its diagonal block of C (by owning module) enters
K unchanged.

The pseudo-curvature is K̄_st = U_sᵀ K U_t (0 across K's blocks), computed from
the factors by a few small matrix products per layer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvscope.curvature.kinds import KFAC_APPROXIMATIONS, KFAC_FLAVOUR_OF, KFAC_FLAVOURS
from curvscope.curvature.objective import Progress, differentiate, no_progress, reported
from curvscope.curvature.operator import CurvatureOperator
from curvscope.curvature.partition import Partition, owner
from curvscope.curvature.ranks import all_sum_array, all_sum_tensors, global_batch, world
from curvscope.errors import CurvscopeError, summary
from curvscope.sources.losses import IGNORE_INDEX, LOSSES, class_scores, counted

TYPE2_LIMIT = 1024  # output values per sample: type-2 takes one backward pass per value


@dataclass
class KroneckerLayer:
    """One module's factors: A (inputs, bias row last) and B (output side), one pair per group of channels."""

    layer: str  # module name
    rule: str  # "linear" | "conv2d"
    weight: int  # index of the weight among the trainable tensors
    bias: int | None  # index of the bias, None without a trainable one
    groups: int  # groups of channels (Conv2d ``groups``; 1 for Linear)
    A: list[torch.Tensor] = field(default_factory=list)  # float64, (d_in/G + [1]) squared, per group
    B: list[torch.Tensor] = field(default_factory=list)  # float64, (d_out/G) squared, per group

    def tensors(self) -> list[int]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def matrices(self, weight: torch.Tensor, bias: torch.Tensor | None) -> list[torch.Tensor]:
        """[V_W | v_b] per group of channels, (d_out/G) × (d_in/G + [1]), for tensors shaped like W and b."""
        rows = weight.reshape(weight.shape[0], -1)
        if bias is not None:
            rows = torch.cat([rows, bias.reshape(-1, 1)], 1)
        return list(rows.chunk(self.groups, 0))

    def product(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(A ⊗ B) applied to the layer's (V_W, v_b): B [V_W | v_b] A per group, back in W's and b's shapes."""
        out = torch.cat([b @ m @ a for a, b, m in zip(self.A, self.B, self.matrices(weight, bias))], 0)
        if bias is None:
            return out.reshape(weight.shape), None
        return out[:, :-1].reshape(weight.shape), out[:, -1].reshape(bias.shape)


@dataclass
class KFAC:
    """The K-FAC approximation of a curvature: the factors of every layer with a rule, the tensors kept exact."""

    flavour: str
    approximation: str  # "expand" | "reduce"
    layers: list[KroneckerLayer]
    names: list[str]  # the trainable tensors
    mc_samples: int
    seed: int
    n_samples: int
    elapsed_s: float

    def _per_tensor(self, outside: list[str], of_layer: Callable[[KroneckerLayer], str]) -> list[str]:
        """`of_layer` of its K-FAC layer for each trainable tensor that has one, `outside` for the others."""
        out = list(outside)
        for layer in self.layers:
            for i in layer.tensors():
                out[i] = of_layer(layer)
        return out

    def tensor_rules(self) -> list[str]:
        """The rule of each trainable tensor: "linear", "conv2d" or "exact"."""
        return self._per_tensor(["exact"] * len(self.names), lambda layer: layer.rule)

    def tensor_blocks(self) -> list[str]:
        """The block of K each trainable tensor belongs to: its K-FAC layer, or ``exact:<owner>``."""
        return self._per_tensor([f"exact:{owner(n)}" for n in self.names], lambda layer: layer.layer)

    @property
    def exact(self) -> list[str]:
        """The trainable tensors without a K-FAC rule, kept exact."""
        return [n for n, rule in zip(self.names, self.tensor_rules()) if rule == "exact"]

    def projection(self, part: Partition, u: Sequence[torch.Tensor], exact: np.ndarray
                   ) -> tuple[np.ndarray, list[str]]:
        """K̄ = UᵀKU on `part` (S × S, float64) and each group's rule.

        `u` is the direction per tensor (float64); `exact` is C̄ on the same partition, whose entries
        between groups of one exact block are K̄'s. Every group must lie within one block of K.
        """
        group_tensors = _group_tensors(part)
        blocks, rules = self.tensor_blocks(), self.tensor_rules()
        group_block = []
        for s, tensors in enumerate(group_tensors):
            found = {blocks[i] for i in tensors}
            if len(found) != 1:
                raise CurvscopeError(f"group {part.names[s]!r} of the {part.kind} partition spans several blocks "
                                     f"of K-FAC ({', '.join(sorted(found))}); K̄ needs every group within one "
                                     f"layer: use the canonical or layer partition.")
            group_block.append(found.pop())
        S = part.size
        kbar = np.zeros((S, S))
        same = np.array([[a == b for b in group_block] for a in group_block], dtype=bool)
        exact_group = np.array([b.startswith("exact:") for b in group_block], dtype=bool)
        keep = same & exact_group[:, None] & exact_group[None, :]
        kbar[keep] = exact[keep]
        device = u[0].device
        for layer in self.layers:
            for t in sorted({s for s in range(S) if group_block[s] == layer.layer}):
                masked = [u[i] * _mask(part.assignment[i], t, u[i]) for i in layer.tensors()]
                kw, kb = layer.product(masked[0], masked[1] if layer.bias is not None else None)
                values: list[torch.Tensor | None] = [None] * len(u)
                values[layer.weight] = kw * u[layer.weight]
                if layer.bias is not None and kb is not None:
                    values[layer.bias] = kb * u[layer.bias]
                kbar[:, t] += part.group_sums(values, torch.zeros(S, dtype=torch.float64, device=device)).cpu().numpy()
        return 0.5 * (kbar + kbar.T), [rules[group_tensors[s][0]] for s in range(S)]


def _mask(assignment: int | torch.Tensor, group: int, like: torch.Tensor) -> torch.Tensor:
    """1 on the scalars of `group` in a tensor with this assignment, 0 elsewhere (float64, `like`'s shape)."""
    if isinstance(assignment, int):
        return torch.full_like(like, float(assignment == group))
    return (assignment.to(like.device) == group).to(like.dtype)


def _group_tensors(part: Partition) -> list[list[int]]:
    """The tensors each group of `part` holds scalars of."""
    out: list[list[int]] = [[] for _ in range(part.size)]
    for i, a in enumerate(part.assignment):
        for s in ([a] if isinstance(a, int) else torch.unique(a).tolist()):
            out[int(s)].append(i)
    return out


# --- the factors ------------------------------------------------------------------------------------


def _candidates(model: nn.Module, names: list[str]) -> list[KroneckerLayer]:
    """Linear and Conv2d modules whose trainable weight they alone own, as layers without factors yet."""
    index = {n: i for i, n in enumerate(names)}
    users: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).forward not in (nn.Linear.forward,
                                                                                 nn.Conv2d.forward):
            continue
        w, b = f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"
        if w not in index or users.get(id(m.weight), 0) != 1:
            continue
        bias = index.get(b) if m.bias is not None and users.get(id(m.bias), 0) == 1 else None
        rule = "linear" if isinstance(m, nn.Linear) else "conv2d"
        out.append(KroneckerLayer(name, rule, index[w], bias, getattr(m, "groups", 1)))
    return out


def _inputs(m: nn.Module, x: torch.Tensor, layer: KroneckerLayer, reduce: bool) -> torch.Tensor | None:
    """ã per position, (n, R, d_in/G (+1)) per group stacked as (G, n, R, ·), or averaged over the positions
    (R = 1) when `reduce`; None when the input is unbatched."""
    if isinstance(m, nn.Conv2d):
        if x.dim() != 4:
            return None
        a = _patches(x, m)
    else:
        if x.dim() < 2:
            return None
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    a = torch.stack(a.chunk(layer.groups, 2))
    if reduce:
        a = a.mean(2, keepdim=True)
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
    return a


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The input patches a Conv2d multiplies by its weight, (n, R, C_in·kh·kw) in the weight's (c, i, j) order.

    Padded as the convolution pads (any padding mode, "same" included), then cut by strided views and copied
    once (``F.unfold`` does the same, but its kernel was measured 100x slower beside other threads on 2 cores).
    """
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    p = x.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh].unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]
    n, c, rows, cols = p.shape[:4]  # p: (n, C_in, H', W', kh, kw)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(n, rows * cols, c * kh * kw)


def _outputs(m: nn.Module, g: torch.Tensor, groups: int, reduce: bool) -> torch.Tensor:
    """The backpropagated vectors at a layer's output per position, (G, n, R, d_out/G), or summed over the
    positions (R = 1) when `reduce`."""
    if isinstance(m, nn.Conv2d):
        g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    else:
        g = g.reshape(g.shape[0], -1, g.shape[-1])
    g = torch.stack(g.chunk(groups, 2))
    return g.sum(2, keepdim=True) if reduce else g


BackwardVectors = list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]  # see _backward_vectors


def kfac(op: CurvatureOperator, flavour: str | None = None, *, approximation: str = "expand", mc_samples: int = 1,
         seed: int = 0, progress: Progress = no_progress) -> KFAC:
    """The K-FAC factors of the curvature of `op` (the GGN or the empirical Fisher) over its analysis set.

    `flavour` defaults to the curvature's (``type-2`` for the GGN, ``empirical`` for the Fisher), `approximation`
    to ``expand`` (``reduce`` sums weight-shared positions out first);
    ``mc`` draws `mc_samples` labels per sample from the model's predictive distribution, seeded by `seed`.
    Accumulated in float64 over the batches; see the module docstring for the formulas.
    """
    if op.name not in KFAC_FLAVOUR_OF:
        raise CurvscopeError(f"K-FAC approximates the GGN or the empirical Fisher, not the {op.title}.")
    flavour = flavour or KFAC_FLAVOUR_OF[op.name]
    if flavour not in KFAC_FLAVOURS:
        raise CurvscopeError(f"K-FAC approximates the GGN (type-2 or mc) or the empirical Fisher (empirical or mc), "
                             f"not the {op.title}.")
    if flavour != "mc" and KFAC_FLAVOUR_OF.get(op.name) != flavour:
        raise CurvscopeError(f"the {flavour} K-FAC approximates the "
                             f"{'GGN' if flavour == 'type-2' else 'empirical Fisher'}, not the {op.title}.")
    if approximation not in KFAC_APPROXIMATIONS:
        raise CurvscopeError(f"unknown K-FAC approximation {approximation!r}: choose one of "
                             f"{', '.join(KFAC_APPROXIMATIONS)}.")
    reduce = approximation == "reduce"
    if mc_samples < 1:
        raise CurvscopeError(f"K-FAC needs at least one Monte-Carlo sample, not {mc_samples}.")
    start = time.perf_counter()
    obj = op.obj
    model = obj.model
    modules = dict(model.named_modules())
    layers = _candidates(model, list(op.names))
    sums_a: dict[str, torch.Tensor] = {}  # per layer, (G, d, d): Σ ã ãᵀ per group of channels
    sums_b: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}
    dropped: set[str] = set()
    for b in reported(progress, "k-fac", len(obj.batches)):
        # MC labels seeded per batch of the whole set (batch 0 by `seed` itself): the same draws however many
        # processes share the batches
        generator = torch.Generator().manual_seed(seed + 1_000_003 * global_batch(b))
        calls: dict[str, list[torch.Tensor | None]] = {lay.layer: [] for lay in layers}  # per call: Σ ã ãᵀ
        outputs: dict[str, torch.Tensor] = {}

        def hook(lay: KroneckerLayer) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
            def record(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                a = _inputs(m, args[0].detach(), lay, reduce)
                calls[lay.layer].append(None if a is None else _second_moment(a.flatten(1, 2)))
                if a is not None:
                    positions[lay.layer] = positions.get(lay.layer, 0) + a.shape[1] * a.shape[2]
                outputs[lay.layer] = out
                return out.clone()  # what follows may change its output in place; the recorded one stays intact
            return record

        handles = [modules[lay.layer].register_forward_hook(hook(lay)) for lay in layers]
        x, y = obj.batches[b]
        try:
            with torch.enable_grad():
                z = obj.outputs(obj.place(x))  # the output rule, BatchNorm mode and math attention of every engine
        except CurvscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model is the user's code
            raise CurvscopeError(f"the model cannot be evaluated on batch {b} (inputs {tuple(x.shape)}): "
                                 f"{summary(exc)}") from None
        finally:
            for h in handles:
                h.remove()
        if not isinstance(z, torch.Tensor) or z.dim() == 0:
            raise CurvscopeError(f"K-FAC needs the model's outputs as one tensor with a row per sample; batch {b} "
                                 f"gives {type(z).__name__}.")
        live = []
        for lay in layers:
            acc = calls[lay.layer][0] if len(calls[lay.layer]) == 1 else None
            if acc is None or lay.layer in dropped or not outputs[lay.layer].requires_grad:
                dropped.add(lay.layer)  # called twice, never, or on unbatched inputs: kept exact
                continue
            sums_a[lay.layer] = sums_a[lay.layer] + acc if lay.layer in sums_a else acc
            live.append(lay)
        for root, vectors, weights in _backward_vectors(op, flavour, b, z, obj.place(y), mc_samples, generator):
            grads = _backpropagate(root, vectors, [outputs[lay.layer] for lay in live])
            for lay, g in zip(live, grads):
                if g is None:
                    continue
                g = _outputs(modules[lay.layer], g.flatten(0, 1), lay.groups, reduce)  # (G, K·n, R, d)
                w = weights.reshape(-1, 1).expand(-1, g.shape[2]).reshape(-1).to(g.dtype)
                acc = _second_moment(g.flatten(1, 2), w)
                sums_b[lay.layer] = sums_b[lay.layer] + acc if lay.layer in sums_b else acc
    _sum_over_ranks(op, layers, sums_a, sums_b, positions, dropped)
    n = obj.n_samples
    kept = []
    for lay in layers:
        if lay.layer in dropped or lay.layer not in sums_a:
            continue
        lay.A = list(sums_a[lay.layer] / positions[lay.layer])
        d_out = op.params[lay.weight].shape[0] // lay.groups
        zero = torch.zeros(lay.groups, d_out, d_out, dtype=torch.float64, device=op.params[lay.weight].device)
        lay.B = list(sums_b.get(lay.layer, zero) / n)
        kept.append(lay)
    return KFAC(flavour, approximation, kept, list(op.names), mc_samples if flavour == "mc" else 1, seed, n,
                time.perf_counter() - start)


def _sum_over_ranks(op: CurvatureOperator, layers: list[KroneckerLayer], sums_a: dict[str, torch.Tensor],
                    sums_b: dict[str, torch.Tensor], positions: dict[str, int], dropped: set[str]) -> None:
    """The factor sums of every rank of a distributed run, in place (nothing in one process): a layer kept exact
    on one rank is kept exact on all; the sums of the others add."""
    if world()[1] == 1:
        return
    for lay, flag in zip(layers, all_sum_array([lay.layer in dropped for lay in layers])):
        if flag:
            dropped.add(lay.layer)
    live = [lay for lay in layers if lay.layer not in dropped and lay.layer in sums_a]
    for lay in live:
        if lay.layer not in sums_b:  # Λ = 0 on every batch of this rank
            d_out = op.params[lay.weight].shape[0] // lay.groups
            sums_b[lay.layer] = sums_a[lay.layer].new_zeros(lay.groups, d_out, d_out)
    counts = all_sum_array([positions.get(lay.layer, 0) for lay in live])
    for lay, c in zip(live, counts):
        positions[lay.layer] = int(round(c))
    all_sum_tensors([t for lay in live for t in (sums_a[lay.layer], sums_b[lay.layer])])


def _second_moment(v: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_r w_r v_r v_rᵀ per group, float64 (G, d, d), for rows v (G, m, d) with weights w (m,) (1 when None).

    Each batch's product is formed in the model's dtype, as its forward and backward passes are, and the
    batches are summed in float64.
    """
    left = v if weights is None else v * weights[None, :, None]
    return torch.bmm(left.transpose(1, 2), v).to(torch.float64)


def _backpropagate(root: torch.Tensor, vectors: torch.Tensor | None, outputs: list[torch.Tensor]
                   ) -> list[torch.Tensor | None]:
    """J_sᵀ v at each layer output s for K vectors v of `root`'s space (K × its shape; None: `root` is a scalar,
    K = 1), each result K × the output's shape: one vmapped backward pass, or one per vector where an
    operation has no batching rule."""
    if vectors is None:
        grads = differentiate(root, outputs, retain_graph=True, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    if vectors.shape[0] > 1:
        try:
            return list(torch.autograd.grad(root, outputs, grad_outputs=vectors, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True))
        except RuntimeError:  # no batching rule for some backward formula: one pass per vector below
            pass
    rows = [differentiate(root, outputs, grad_outputs=v, retain_graph=True, allow_unused=True) for v in vectors]
    return [None if rows[0][i] is None else torch.stack([cast(torch.Tensor, r[i]) for r in rows])
            for i in range(len(outputs))]


def _backward_vectors(op: CurvatureOperator, flavour: str, b: int, z: torch.Tensor, y: torch.Tensor,
                      mc_samples: int, generator: torch.Generator) -> BackwardVectors:
    """What to backpropagate from the outputs z of batch b: (root, its K vectors or None for a scalar root,
    the K × n weights σ of each sample's outer products)."""
    n = z.shape[0]
    ones = torch.ones(1, n, dtype=torch.float64, device=z.device)
    if flavour == "empirical":
        losses = op.per_sample_losses(z, y)  # type: ignore[attr-defined]
        return [(losses.sum(), None, ones)]
    if flavour == "mc":
        # The batch loss averages its c counted label positions: n_b ∇²_{z_n} L_b = (n_b/c) Σ_t H_{n,t}, while the
        # sampled gradients of n_b L_b have E[g gᵀ] = (n_b/c)² Σ_t H_{n,t} (the positions' cross terms vanish):
        # hence the weight c/n_b (1 for one label per sample; mse's noise already accounts for its values).
        terms = 1.0 if op.obj.loss_fn is LOSSES["mse"] else float(counted(y)) / n
        return [(n * op.obj.loss_fn(z, _sample(op, z, y, generator)), None, ones * terms / mc_samples)
                for _ in range(mc_samples)]
    state = op.output_state(b, z.detach())  # type: ignore[attr-defined]
    if state is None:  # Λ = 0
        return []
    C = z[0].numel()
    if C > TYPE2_LIMIT:
        raise CurvscopeError(f"type-2 K-FAC backpropagates each of the {C} output values per sample (limit "
                             f"{TYPE2_LIMIT}): use --kfac mc, which samples labels instead.")
    basis = torch.eye(C, dtype=z.dtype, device=z.device)
    cols = op.output_product(state, basis[:, None, :].expand(C, n, C).reshape((C,) + tuple(z.shape)))  # type: ignore
    if cols is None:
        return []
    lam = n * cols.reshape(C, n, C).permute(1, 2, 0).to(torch.float64)  # Λ_n[i, c] = n_b (Λ_b e_c)[n, i]
    values, vectors = torch.linalg.eigh(0.5 * (lam + lam.transpose(1, 2)))
    tiny = 1e-13 * float(values.abs().max()) if values.numel() else 0.0
    keep = (values.abs() > tiny).any(0)  # eigen-directions that carry curvature for some sample (CE: C − 1)
    v = (vectors * values.abs().sqrt()[:, None, :])[:, :, keep]  # (n, C, K): column c is √|λ_c| e_c
    return [(z, v.permute(2, 0, 1).to(z.dtype).reshape((-1,) + tuple(z.shape)), torch.sign(values[:, keep]).T)]


def _sample(op: CurvatureOperator, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels ŷ drawn from the predictive distribution that the built-in loss of `op` implies (see the module)."""
    loss_fn = op.obj.loss_fn
    zc = z.detach().to("cpu", torch.float64)
    if loss_fn in (LOSSES["cross_entropy"], LOSSES["nll"]):
        if zc.dim() < 2 or y.is_floating_point():
            raise CurvscopeError(f"Monte-Carlo K-FAC needs class scores with integer targets, not outputs of shape "
                                 f"{tuple(z.shape)} with {y.dtype} targets.")
        zc = class_scores(zc, y)  # classes along dimension 1, sequence layouts included
        logp = torch.log_softmax(zc, 1) if loss_fn is LOSSES["cross_entropy"] else zc
        if loss_fn is LOSSES["nll"] and not bool((torch.logsumexp(zc, 1).abs() <= 1e-4).all()):
            raise CurvscopeError("Monte-Carlo K-FAC with the nll loss needs log-probabilities as outputs.")
        p = logp.exp().movedim(1, -1).reshape(-1, zc.shape[1])
        draw = torch.multinomial(p, 1, generator=generator).reshape(zc.movedim(1, -1).shape[:-1]).to(y.device)
        return torch.where(y == IGNORE_INDEX, y, draw.reshape(y.shape))  # ignored positions stay ignored
    if loss_fn is LOSSES["mse"]:
        d = zc[0].numel()
        noise = torch.randn(zc.shape, generator=generator, dtype=torch.float64) * math.sqrt(d / 2)
        return (zc + noise).to(z.device, z.dtype)
    raise CurvscopeError("Monte-Carlo K-FAC samples labels from the predictive distribution of a built-in loss "
                         "(cross_entropy, nll, mse); this loss is the user's own: use the curvature's own flavour.")
