"""Curvatures of the form C_b = J_bᵀ Q_b J_b: the machinery shared by the GGN and the empirical Fisher.

Each batch b has a function f_b: θ ↦ R^{m_b} of the parameters (the model's
outputs z, or the per-sample losses ℓ) with Jacobian J_b = ∂f_b/∂θ, and a
symmetric m_b × m_b matrix Q_b applied to vectors in f_b's space (the loss's
Hessian with respect to the outputs, or I/n_b). Then

    C = Σ_b w_b C_b,   C_b = J_bᵀ Q_b J_b,   w_b = n_b/N.

A subclass (:mod:`curvscope.curvature.ggn`, :mod:`curvscope.curvature.fisher`)
says only which f_b (:meth:`OutputSpaceOperator.batch_function`) and which
Q_b (:meth:`OutputSpaceOperator.output_product`).

**Projection** C̄_b = UᵀC_bU. With D = [J_b U_1, …, J_b U_S] (S columns in f_b's
space), C̄_b = Dᵀ Q_b D, accumulated in float64 and symmetrised. D is formed in
one of two exact ways (``jacobian``):

- ``forward-mode``: S Jacobian-vector products, ``torch.func.jvp`` over
  ``torch.func.functional_call`` vmapped over the tangents U_s (built per
  group, in chunks that fit ``max_memory``; each chunk differentiates only
  the tensors its groups touch). First-order forward mode is exact through
  LayerNorm (torch 2.13 errs only forward-over-reverse).
- ``double-vjp``: one forward and one backward with a graph, h(w) = J_bᵀ w at
  a dummy w, then J_b U_s = ∂⟨h(w), U_s⟩/∂w by one backward per group,
  reverse-over-reverse as the Hessian (each backward traverses only the part
  of the graph that group s reaches, and the forward pass is shared).
- ``auto`` (default): on a CPU, double-vjp when every group is made of whole
  tensors (canonical, layer, trivial partitions) and forward mode when groups
  split tensors (discrete: many tangents through a tiny model, where one
  vmapped pass beats S backward passes). Measured single-threaded at 2×128
  samples, double-vjp takes 0.5–0.7× the time of forward mode on whole-tensor
  partitions (MLP 784-256-256-10, a TransformerEncoderLayer, LeNet-5: there
  the vmapped tangents carry zeros through every layer, S times the work),
  and forward mode 0.3–0.5× that of double-vjp on discrete partitions of the
  test models. On other devices both are timed on batch 0 and the faster is
  used for the other batches. A model with an operation that has no
  forward-mode derivative (a custom autograd Function without ``jvp``) falls
  back to double-vjp. The method used is recorded as the result's
  ``strategy``.

When Q_0 = 0 (the GGN of a loss linear in the outputs), found on batch 0 by applying Q_0 to a random vector, no Jacobian
is formed: each batch's Q_b is checked the same way and C̄_b = 0, C_b v = 0.

**Products** (C_b)_BB v = J_Bᵀ Q_b (J_B v_B) for a block B of tensors: the tangent
is v on B and zero elsewhere, and only the rows of B are returned. When every
batch's graphs (the forward graph of f_b and the backward graph of h(w) = J_bᵀw)
fit ``max_memory`` they are kept (``cached``): J_B v = ∂⟨h_B(w), v⟩/∂w and
J_Bᵀ(Q J_B v) are two backward passes on kept graphs. Otherwise (``streamed``)
each product runs one forward-mode pass (``torch.autograd.forward_ad``) that
also records the reverse graph of f_b, then one backward; a model that forward
mode cannot differentiate is done by double-vjp instead.

The data-convolution speed-up (``data_conv``) is a custom autograd Function
without a forward-mode rule: it is used only in the reverse (double-vjp) paths.
"""
from __future__ import annotations

import time
import warnings
from abc import abstractmethod
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator, Sequence, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp, vmap

from curvscope.curvature.data_conv import data_convolutions
from curvscope.curvature.objective import differentiate
from curvscope.curvature.operator import CurvatureOperator, saved_bytes
from curvscope.curvature.partition import Partition
from curvscope.errors import CurvscopeError, summary

JACOBIANS = ("auto", "forward-mode", "double-vjp")
BatchFunction = Callable[[Sequence[torch.Tensor]], torch.Tensor]

# What a failed forward-mode derivative raises: an operation without a forward-mode formula or batching rule.
_FORWARD_FAILURES = (RuntimeError, NotImplementedError)


def _load_jvp_decompositions() -> None:
    """Import the decompositions ``torch.func.jvp`` loads on first use, without the DeprecationWarning that
    their ``torch.jit.script`` raises in torch 2.13 (PyTorch's own code, not ours or the user's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # another PyTorch: it loads what it needs itself
            pass


@contextmanager
def _forward_mode() -> Iterator[None]:
    """Forward-mode differentiation: disable PyTorch's native multi-head attention fast path (it has no
    forward-mode derivative) while inside."""
    _load_jvp_decompositions()
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class OutputSpaceOperator(CurvatureOperator):
    """C = Σ_b w_b J_bᵀ Q_b J_b with J_b = ∂f_b/∂θ (see the module docstring).

    Subclasses define f_b (:meth:`batch_function`) and Q_b (:meth:`output_product`).
    ``jacobian`` ("auto", "forward-mode" or "double-vjp") chooses how projections form J_b U_s;
    it may be set on an instance before :meth:`projection`.
    """

    method = "forward-mode"
    jacobian: str = "auto"
    values_are_losses: ClassVar[bool] = False  # whether f_b's values are losses (then they must be finite)
    _cache: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None], object]]
    _prepared = False
    _forward_fails: str = ""  # why forward mode failed on this model ("" while it has not)
    _activation_bytes: int = 0  # memory of one forward pass's activations, per sample
    _zero_at_0: bool | None = None  # whether Q_0 = 0 (then every batch is looked at before forming D)

    # --- what a J^T Q J curvature defines ---------------------------------------------------------

    @abstractmethod
    def batch_function(self, b: int) -> BatchFunction:
        """f_b as a function of the trainable tensors (a list in ``self.params`` order); its output's first
        dimension indexes the samples of batch b."""

    @abstractmethod
    def output_state(self, b: int, value: torch.Tensor) -> object:
        """Whatever :meth:`output_product` needs to apply Q_b at f_b(θ) = `value` (detached)."""

    @abstractmethod
    def output_product(self, state: object, vectors: torch.Tensor) -> torch.Tensor | None:
        """Q_b V for the k vectors V (k × f_b's shape, the model's dtype); None when Q_b = 0."""

    # --- evaluation -------------------------------------------------------------------------------

    def functional_model(self, b: int) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
        """θ ↦ z = model(x_b) (a list of trainable tensors, ``functional_call``; tied weights stay tied),
        under the math attention backend, the predictions taken by the objective's output rule and BatchNorm mode
        (:meth:`curvscope.curvature.objective.Objective.outputs`)."""
        x, _ = self.obj.batches[b]
        x = self.obj.place(x)
        obj, names = self.obj, self.names

        def outputs(params: Sequence[torch.Tensor]) -> torch.Tensor:
            return obj.outputs(x, dict(zip(names, params)))

        return outputs

    def _evaluate(self, b: int, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """f_b(params), with the model's and the loss's errors reported as bad input."""
        try:
            value = self.batch_function(b)(params)
        except CurvscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model and the loss are the user's code
            x, y = self.obj.batches[b]
            raise CurvscopeError(f"the model and loss cannot be evaluated on batch {b} (inputs {tuple(x.shape)}, "
                                 f"targets {tuple(y.shape)}): {summary(exc)}") from None
        self._check_value(b, value)
        return value

    def _check_value(self, b: int, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise CurvscopeError(f"the {self.title} needs one output row per sample; batch {b} gives "
                                 f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}.")
        if self.values_are_losses and not bool(torch.isfinite(value.detach()).all()):
            raise CurvscopeError(f"a loss is {float(value.detach()[~torch.isfinite(value.detach())][0])} on batch "
                                 f"{b}: the {self.title} is undefined there (check the weights and the data for NaN, "
                                 f"Inf or overflow).")

    def _reverse_graphs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """f_b(θ) with its graph, a dummy w (zeros, requiring grad) and h(w) = J_bᵀw with its graph."""
        with data_convolutions(self.obj.model):
            value = self._evaluate(b, self.params)
        w = torch.zeros_like(value, requires_grad=True)
        if not value.requires_grad:  # f_b does not depend on the parameters
            return value, w, [None] * len(self.params)
        h = differentiate(value, self.params, grad_outputs=w, create_graph=True, allow_unused=True)
        return value, w, [None if t is None or not t.requires_grad else t for t in h]

    # --- projections --------------------------------------------------------------------------------

    def _check(self, part: Partition) -> None:
        if tuple(part.tensor_names) != tuple(self.names):
            raise CurvscopeError(f"the partition is of tensors {', '.join(part.tensor_names)}, not of this model's "
                                 f"trainable tensors {', '.join(self.names)}.")

    def _tangents(self, u: list[torch.Tensor], part: Partition, s0: int, s1: int
                  ) -> tuple[list[int], list[torch.Tensor]]:
        """The tensors that groups s0..s1-1 touch and, for each, the k = s1 − s0 tangents U_s (k × its shape)."""
        k = s1 - s0
        idx, tans = [], []
        for i, (a, ui) in enumerate(zip(part.assignment, u)):
            if isinstance(a, int):
                if not s0 <= a < s1:
                    continue
                t = ui.new_zeros((k,) + tuple(ui.shape))
                t[a - s0] = ui
            else:
                a = a.to(ui.device)
                if not bool(((a >= s0) & (a < s1)).any()):
                    continue
                ids = torch.arange(s0, s1, device=ui.device).view((k,) + (1,) * ui.dim())
                t = torch.where(a.unsqueeze(0) == ids, ui.unsqueeze(0), ui.new_zeros(()))
            idx.append(i)
            tans.append(t)
        return idx, tans

    def _chunk(self, b: int, S: int) -> int:
        """How many tangents one vmapped forward-mode pass carries: as many as fit ``max_memory``."""
        if not self._activation_bytes:  # what a forward pass saves, per sample: a bound on a tangent's activations
            pack, seen = saved_bytes()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self._evaluate(0, self.params)
            self._activation_bytes = max(1, sum(seen.values()) // max(int(self.obj.batches[0][0].shape[0]), 1))
        per = (self._activation_bytes * int(self.obj.batches[b][0].shape[0])
               + sum(p.numel() * p.element_size() for p in self.params))
        return max(1, min(S, self.max_memory // (2 * per)))

    def columns_forward(self, b: int, u: list[torch.Tensor], part: Partition
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """f_b(θ) and D = [J_b U_1, …, J_b U_S] (S × m_b, the model's dtype) by vmapped forward-mode jvps."""
        f = self.batch_function(b)
        base = [p.detach() for p in self.params]
        S, k = part.size, self._chunk(b, part.size)
        value: torch.Tensor | None = None
        blocks: list[torch.Tensor | None] = []
        with _forward_mode():
            for s0 in range(0, S, k):
                s1 = min(S, s0 + k)
                idx, tans = self._tangents(u, part, s0, s1)
                if not idx:
                    blocks.append(None)
                    continue

                def restricted(*sub: torch.Tensor, idx: list[int] = idx) -> torch.Tensor:
                    ps = list(base)
                    for i, t in zip(idx, sub):
                        ps[i] = t
                    return f(ps)

                primals = tuple(base[i] for i in idx)
                batched = vmap(lambda *t: jvp(restricted, primals, t), out_dims=(None, 0))  # type: ignore[arg-type]
                value, cols = cast(tuple[torch.Tensor, torch.Tensor], batched(*tans))
                blocks.append(cols.reshape(s1 - s0, -1))
        if value is None:  # no group holds a scalar: D = 0
            value = self._evaluate(b, base)
        self._check_value(b, value)
        return value, torch.cat([c if c is not None else value.new_zeros(min(k, S - j * k), value.numel())
                                 for j, c in enumerate(blocks)])

    def columns_reverse(self, b: int, u: list[torch.Tensor], part: Partition
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """f_b(θ) and D = [J_b U_1, …, J_b U_S] (S × m_b, the model's dtype) by the double-vjp trick,
        J_b U_s = ∂⟨J_bᵀw, U_s⟩/∂w (one backward per group)."""
        value, w, h = self._reverse_graphs(b)
        z = part.group_scalars([None if t is None else t * ui for t, ui in zip(h, u)])
        out = value.new_zeros(part.size, value.numel())
        for s, zs in enumerate(z):
            if zs is None or not zs.requires_grad:
                continue
            (col,) = differentiate(zs, [w], retain_graph=True, allow_unused=True)
            if col is not None:
                out[s] = col.reshape(-1)
        return value.detach(), out

    def _projection_from_columns(self, b: int, value: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """C̄_b = Dᵀ Q_b D in float64, symmetrised (D is S × m_b, f_b(θ) = `value`)."""
        q = self.output_product(self.output_state(b, value),
                                cols.reshape((cols.shape[0],) + tuple(value.shape)))
        if q is None:
            return torch.zeros(cols.shape[0], cols.shape[0], dtype=torch.float64, device=cols.device)
        out = cols.to(torch.float64) @ q.reshape(cols.shape[0], -1).to(torch.float64).T
        return 0.5 * (out + out.T)

    def batch_projection(self, b: int, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition,
                         method: str | None = None) -> torch.Tensor:
        """C̄_b = Uᵀ J_bᵀ Q_b J_b U = Dᵀ Q_b D (float64, S × S), u held fixed; D by the Jacobian `method`
        (default: the operator's; "auto" is forward mode, or double-vjp where forward mode fails)."""
        self._check(part)
        jacobian = method or self.jacobian
        if jacobian not in JACOBIANS:
            raise CurvscopeError(f"unknown Jacobian method {jacobian!r}: choose one of {', '.join(JACOBIANS)}.")
        if self._vanishes(b):
            return torch.zeros(part.size, part.size, dtype=torch.float64, device=u64[0].device)
        if jacobian != "double-vjp" and not self._forward_fails:
            try:
                return self._projection_from_columns(b, *self.columns_forward(b, u, part))
            except _FORWARD_FAILURES as exc:
                if jacobian == "forward-mode":
                    raise CurvscopeError(f"forward-mode differentiation fails on this model ({summary(exc)}): "
                                         f"use the double-vjp method.") from None
                self._forward_fails = summary(exc)
        return self._projection_from_columns(b, *self.columns_reverse(b, u, part))

    def vanishes(self, state: object) -> bool:
        """Whether Q_b = 0 for this :meth:`output_state` (None by convention: the loss is linear in f_b)."""
        return state is None

    def _vanishes(self, b: int) -> bool:
        """Whether Q_b = 0, so that C̄_b = 0 without forming D: looked at once on batch 0 (one forward without a
        graph), and on the other batches only when Q_0 = 0 (NLL on log-probabilities, for the GGN)."""
        if self._zero_at_0 is None:
            self._zero_at_0 = self._state_vanishes(0)
        if not self._zero_at_0:
            return False
        return b == 0 or self._state_vanishes(b)

    def _state_vanishes(self, b: int) -> bool:
        """Q_b = 0 when the state says so or Q_b maps a random vector to exactly zero (NLL's output Hessian is
        formed as zeros by autograd; a nonzero Q_b annihilates a random vector with probability 0)."""
        with torch.no_grad():
            value = self._evaluate(b, [p.detach() for p in self.params])
        state = self.output_state(b, value)
        if self.vanishes(state):
            return True
        probe = torch.randn((1,) + tuple(value.shape), generator=torch.Generator().manual_seed(b), dtype=value.dtype)
        q = self.output_product(state, probe.to(value.device))
        return q is None or not bool(q.any())

    def projection_method(self, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition,
                          strategy: str) -> tuple[str, torch.Tensor | None]:
        """The Jacobian method (timed on batch 0 when ``jacobian`` is auto) and C̄_0, computed while choosing."""
        if strategy != "auto":
            raise CurvscopeError(f"--strategy {strategy} is for the Hessian; the {self.title} chooses its own "
                                 f"method ({', '.join(JACOBIANS[1:])}): leave --strategy at auto.")
        return self._choose_jacobian(u, u64, part)

    def _choose_jacobian(self, u: list[torch.Tensor], u64: list[torch.Tensor], part: Partition
                         ) -> tuple[str, torch.Tensor]:
        """The Jacobian method for this projection and C̄_0 (computed while choosing)."""
        if self.jacobian != "auto":
            return self.jacobian, self.batch_projection(0, u, u64, part, self.jacobian)
        if self.device.type == "cpu":  # measured: see the module docstring
            if any(isinstance(a, torch.Tensor) for a in part.assignment):  # groups within tensors (discrete)
                first = self.batch_projection(0, u, u64, part, "auto")  # forward mode unless it fails
                return ("double-vjp" if self._forward_fails else "forward-mode"), first
            return "double-vjp", self.batch_projection(0, u, u64, part, "double-vjp")
        timings: dict[str, float] = {}
        results: dict[str, torch.Tensor] = {}
        _load_jvp_decompositions()  # one-time costs stay out of the timings
        self._chunk(0, part.size)
        for name in ("forward-mode", "double-vjp"):
            if name == "forward-mode" and self._forward_fails:
                continue
            self._synchronize()
            start = time.perf_counter()
            try:
                results[name] = self.batch_projection(0, u, u64, part, name)
            except CurvscopeError:
                if name == "double-vjp" and not results:
                    raise
                if name == "forward-mode":
                    self._forward_fails = "forward-mode differentiation failed"
                continue
            self._synchronize()
            timings[name] = time.perf_counter() - start
        chosen = min(timings, key=lambda k: timings[k])
        return chosen, results[chosen]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- products -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Measure batch 0's graphs (f_b's forward graph, h(w) = J_bᵀw's backward graph); keep every batch's
        when all of them fit ``max_memory``."""
        pack, seen = saved_bytes()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            first = self._cached_batch(0)
        n0 = max(int(self.obj.batches[0][0].shape[0]), 1)
        self.graph_bytes = int(sum(seen.values()) * self.obj.local_samples / n0)
        self.mode = "cached" if self.graph_bytes <= self.max_memory else "streamed"
        self._cache = [first] if self.mode == "cached" else []
        if self.mode == "cached":
            for b in range(1, len(self.obj.batches)):
                self._cache.append(self._cached_batch(b))
                self.progress("graphs", b + 1, len(self.obj.batches))
        self._prepared = True

    def _cached_batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None], object]:
        value, w, h = self._reverse_graphs(b)
        return value, w, h, self.output_state(b, value.detach())

    def release(self) -> None:
        self._cache, self._prepared = [], False

    def batch_product(self, b: int, indices: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """(C_b)_BB v = J_Bᵀ Q_b J_B v_B: a Jacobian-vector product, Q_b, then a vector-Jacobian product."""
        if self._vanishes(b):
            return [None] * len(indices)
        if not self._prepared:
            self.prepare()
        block = [self.params[i] for i in indices]
        if self.mode == "cached":
            value, w, h, state = self._cache[b]
            return self._product_on_graphs(value, w, h, state, indices, chunks, block, retain=True)
        if not self._forward_fails:
            try:
                value, tangent = self._jvp_with_graph(b, indices, chunks)
            except _FORWARD_FAILURES as exc:
                self._forward_fails = summary(exc)
            else:
                q = self.output_product(self.output_state(b, value.detach()), tangent.unsqueeze(0))
                if q is None or not value.requires_grad:
                    return [None] * len(indices)
                return list(differentiate(value, block, grad_outputs=q[0].to(value.dtype), allow_unused=True))
        value, w, h = self._reverse_graphs(b)
        return self._product_on_graphs(value, w, h, self.output_state(b, value.detach()), indices, chunks, block,
                                       retain=False)

    def _jvp_with_graph(self, b: int, indices: list[int], chunks: list[torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """f_b(θ) with its reverse graph, and J_B v (zeros when f_b does not depend on the block), in one
        forward-mode pass."""
        f = self.batch_function(b)
        with _forward_mode(), fwAD.dual_level():
            ps: list[torch.Tensor] = list(self.params)
            for i, c in zip(indices, chunks):
                ps[i] = fwAD.make_dual(self.params[i], c)
            try:
                out = f(ps)
            except _FORWARD_FAILURES:
                raise
            except Exception as exc:  # noqa: BLE001 - the model and the loss are the user's code
                raise CurvscopeError(f"the model and loss cannot be evaluated on batch {b}: {summary(exc)}") from None
            value, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            tangent = torch.zeros_like(value)
        return value, tangent.detach()

    def _product_on_graphs(self, value: torch.Tensor, w: torch.Tensor, h: list[torch.Tensor | None], state: object,
                           indices: list[int], chunks: list[torch.Tensor], block: list[torch.Tensor],
                           retain: bool) -> list[torch.Tensor | None]:
        """J_Bᵀ Q J_B v from the graphs of f_b and h(w) = J_bᵀw: J_B v = ∂⟨h_B(w), v⟩/∂w, then a vjp."""
        terms = [(hi * c).sum() for hi, c in zip((h[i] for i in indices), chunks) if hi is not None]
        if not terms or not value.requires_grad or self.vanishes(state):
            return [None] * len(indices)
        (jv,) = differentiate(torch.stack(terms).sum(), [w], retain_graph=True, allow_unused=True)
        if jv is None:
            return [None] * len(indices)
        q = self.output_product(state, jv.unsqueeze(0))
        if q is None:
            return [None] * len(indices)
        return list(differentiate(value, block, grad_outputs=q[0].to(value.dtype), retain_graph=retain,
                                  allow_unused=True))
