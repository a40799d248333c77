"""The Hessian H = ∇²L, by reverse-over-reverse differentiation (double backward).

Reverse-over-reverse is exact through LayerNorm, where forward-over-reverse
(``jvp`` over ``jacrev``) is not on torch 2.13 (docs/DESIGN.md §2).

Products: (H_b)_BB v = ∂/∂θ_B (∇_B L_b · v_B), differentiated with respect to
θ_B only. When every batch's double-backward graph fits ``max_memory`` the
graphs are built on the first product and reused by every later one
(``cached``); otherwise each product rebuilds them batch by batch
(``streamed``). The memory of one batch's graph is measured, not guessed, by
counting the bytes autograd saves for it.

Order-3 diagonal: D_s = −U_sᵀ∇(U_sᵀHU_s), one differentiation more of H̄'s diagonal (on request).

Projection: for each batch, z_s = U_sᵀ∇L_b (one backward with a graph), then row
s of H̄_b is the gradient of z_s dotted with each U_t, which is U_sᵀ H_b U_t.
Strategies for the S second backward passes per batch:

- ``triangular``: row s is differentiated only with respect to the tensors
  holding groups t ≥ s, and the lower triangle is filled by symmetry (fastest
  on CPU, measured in scripts/bench.py);
- ``batched``: all S rows in one vmapped backward (``is_grads_batched``);
- ``auto``: triangular on CPU; on other devices the faster of the two, timed
  on the first batch.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from curvscope.curvature import ranks
from curvscope.curvature.kinds import KINDS
from curvscope.curvature.moments import WeightedMoments
from curvscope.curvature.objective import Objective, Progress, differentiate, no_progress, reported
from curvscope.curvature.operator import CurvatureOperator, saved_bytes
from curvscope.curvature.partition import Partition
from curvscope.errors import CurvscopeError

STRATEGIES = ("auto", "triangular", "batched")


def _rows_triangular(z: list[torch.Tensor | None], params: list[torch.Tensor], u64: list[torch.Tensor],
                     part: Partition) -> torch.Tensor:
    S = part.size
    out = torch.zeros(S, S, dtype=torch.float64, device=u64[0].device)
    for s in range(S):
        zs = z[s]
        if zs is None or not zs.requires_grad:
            continue
        idx = part.tensors_reaching(s)
        hv = differentiate(zs, [params[i] for i in idx], retain_graph=True, allow_unused=True)
        prods: list[torch.Tensor | None] = [None] * len(params)
        for i, h in zip(idx, hv):
            prods[i] = None if h is None else h.to(torch.float64) * u64[i]
        row = part.group_sums(prods, torch.zeros(S, dtype=torch.float64, device=u64[0].device))
        out[s, s:] = row[s:]
    return torch.triu(out) + torch.triu(out, 1).T


def _rows_batched(z: list[torch.Tensor | None], params: list[torch.Tensor], u64: list[torch.Tensor],
                  part: Partition) -> torch.Tensor:
    S = part.size
    zero = next(t for t in z if t is not None).new_zeros(())
    vec = torch.stack([zero if t is None else t for t in z])
    eye = torch.eye(S, dtype=vec.dtype, device=vec.device)
    hv = differentiate(vec, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    rows = torch.zeros(S, S, dtype=torch.float64, device=vec.device)
    for s in range(S):
        prods = [None if h is None else h[s].to(torch.float64) * u for h, u in zip(hv, u64)]
        rows[s] = part.group_sums(prods, rows[s])
    return 0.5 * (rows + rows.T)


ROWS = {"triangular": _rows_triangular, "batched": _rows_batched}


def _measured_graph(obj: Objective, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """∇L_0 with its graph for batch 0, and the bytes autograd saved to build it."""
    pack, seen = saved_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grads = obj.gradient_with_graph(0, params)
    return grads, sum(seen.values())


class HessianOperator(CurvatureOperator):
    """H = Σ_b (n_b/N) ∇²L_b, with the double-backward graphs kept when they fit `max_memory`."""

    kind, method = KINDS["hessian"], "triangular"
    _graphs: list[list[torch.Tensor]]
    _prepared = False

    def prepare(self) -> None:
        """Measure one batch's graph; keep every batch's graph when all of them fit `max_memory`."""
        first, nbytes = _measured_graph(self.obj, self.params)
        self.graph_bytes = int(nbytes * self.obj.local_samples / max(int(self.obj.batches[0][0].shape[0]), 1))
        self.mode = "cached" if self.graph_bytes <= self.max_memory else "streamed"
        self._graphs = [first] if self.mode == "cached" else []
        if self.mode == "cached":
            for b in range(1, len(self.obj.batches)):
                self._graphs.append(self.obj.gradient_with_graph(b, self.params))
                self.progress("graphs", b + 1, len(self.obj.batches))
        self._prepared = True

    def release(self) -> None:
        self._graphs, self._prepared = [], False

    def batch_product(self, b: int, indices: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not self._prepared:
            self.prepare()
        grads = self._graphs[b] if self.mode == "cached" else self.obj.gradient_with_graph(b, self.params)
        outs = [grads[i] for i in indices]
        if not any(o.requires_grad for o in outs):
            return [None] * len(indices)  # the loss is linear in this block
        return list(differentiate(outs, [self.params[i] for i in indices], grad_outputs=chunks,
                                  retain_graph=self.mode == "cached", allow_unused=True))

    def _directional(self, b: int, u: list[torch.Tensor], part: Partition) -> list[torch.Tensor | None]:
        """z_s = U_sᵀ∇L_b for every group s, each with the graph of ∇L_b kept (None: L_b is linear there)."""
        grads = self.obj.gradient_with_graph(b, self.params)
        return part.group_scalars([g * ui if g.requires_grad else None for g, ui in zip(grads, u)])

    def batch_projection(self, b: int, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition,
                         method: str | None = None) -> torch.Tensor:
        """H̄_b = Uᵀ H_b U (float64, S × S), u held fixed, by the strategy `method` (triangular when None)."""
        z = self._directional(b, u, part)
        if all(t is None for t in z):  # the loss is linear in every parameter
            return torch.zeros(part.size, part.size, dtype=torch.float64, device=u64[0].device)
        return ROWS[method or self.method](z, self.params, u64, part)

    def batch_order3(self, b: int, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition) -> np.ndarray:
        """D_b (S,): for each group s, D_s = −U_sᵀ ∇(U_sᵀ H_b U_s), H̄_b's diagonal entry differentiated once more
        along U_s (float64)."""
        z = self._directional(b, u, part)
        out = np.zeros(part.size)
        for s, zs in enumerate(z):
            if zs is None or not zs.requires_grad:
                continue
            own = part.tensors_of(s)  # only group s's tensors: its entry of H_b U_s, then of ∇(U_sᵀH_bU_s)
            values: list[torch.Tensor | None] = [None] * len(self.params)
            hu = differentiate(zs, [self.params[i] for i in own], create_graph=True, allow_unused=True)
            for i, h in zip(own, hu):
                values[i] = None if h is None else h * u[i]
            diag = part.group_scalars(values)[s]  # U_sᵀH_bU_s, with its graph
            if diag is None or not diag.requires_grad:
                continue  # H_b is constant along U_s
            third = differentiate(diag, [self.params[i] for i in own], retain_graph=True, allow_unused=True)
            prods: list[torch.Tensor | None] = [None] * len(self.params)
            for i, t in zip(own, third):
                prods[i] = None if t is None else t.to(torch.float64) * u64[i]
            out[s] = -float(part.group_sums(prods, torch.zeros(part.size, dtype=torch.float64,
                                                               device=u64[0].device))[s])
        return out

    def order3(self, part: Partition, gradient: tuple[list[torch.Tensor], float],
               progress: Progress = no_progress) -> tuple[np.ndarray, np.ndarray]:
        """D_s = ∂³L/∂η_s³ at η = 0 for η ↦ L(θ − Σ_t η_t U_t), i.e. −∇³L[U_s, U_s, U_s], for every group s,
        with u = g the full gradient (`gradient` = (g, L)): Σ_b w_b D_b exactly, and its standard error across
        batches (streamed, and summed over the ranks of a distributed run, as C̄)."""
        u64 = gradient[0]
        u = [g.to(p.dtype) for g, p in zip(u64, self.params)]
        moments = WeightedMoments()
        for b in reported(progress, "order-3", len(self.obj.weights)):
            moments.add(self.obj.weights[b], self.batch_order3(b, u, u64, part))
        moments = moments.summed(ranks.all_sum_array)
        return moments.mean, moments.stderr

    def projection_method(self, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition,
                          strategy: str) -> tuple[str, torch.Tensor | None]:
        """The strategy to use; when timing decides it, also H̄_0 (already computed)."""
        if strategy not in STRATEGIES:
            raise CurvscopeError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
        if strategy != "auto":
            return strategy, None
        if self.device.type == "cpu":
            return "triangular", None
        timings, first = {}, None
        for name in ("triangular", "batched"):
            torch.cuda.synchronize(self.device) if self.device.type == "cuda" else None
            start = time.perf_counter()
            try:
                first = self.batch_projection(0, u, u64, part, name)
            except (RuntimeError, CurvscopeError):  # an operator without a batching rule
                continue
            torch.cuda.synchronize(self.device) if self.device.type == "cuda" else None
            timings[name] = time.perf_counter() - start
        if not timings:
            raise CurvscopeError("neither projection strategy can differentiate this model twice on this device.")
        return min(timings, key=lambda k: timings[k]), first
