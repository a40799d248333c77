"""The GGN G and the empirical Fisher F against exact dense float64 references built in reverse mode.

G = Σ_b w_b J_bᵀ (∇²_z L_b) J_b with J_b the dense Jacobian of the outputs
(torch.autograd.functional.jacobian) and ∇²_z L_b the dense Hessian of the loss
in the outputs; F = (1/N) Σ_n ∇ℓ_n∇ℓ_nᵀ from per-sample gradients (one backward
per sample). Projections C̄ = PᵀCP, products C_BB v and the identities G = H
(model linear in its parameters, MSE) and G, F, F̄ ⪰ 0 are checked, through
LayerNorm, BatchNorm in eval mode, attention and tied weights.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Case, TwoHeads, dense, make_case
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope.curvature.fisher import FisherOperator
from curvscope.curvature.gauss_newton import OutputSpaceOperator
from curvscope.curvature.ggn import GGNOperator
from curvscope.curvature.hessian import HessianOperator
from curvscope.curvature.kinds import KINDS
from curvscope.curvature.partition import Partition, make_partition, trainable
from curvscope.errors import CurvscopeError
from curvscope.sources.losses import mse

OPERATORS = {"ggn": GGNOperator, "fisher": FisherOperator}
JACOBIANS = ["auto", "forward-mode", "double-vjp"]


class BatchNormNet(nn.Module):
    """Linear → BatchNorm1d (eval mode, non-trivial running statistics and affine terms) → tanh → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(5))
            self.bn.running_var.copy_(torch.rand(5) + 0.5)
            self.bn.weight.copy_(torch.randn(5))
            self.bn.bias.copy_(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


class TiedNet(nn.Module):
    """Two layers sharing one weight tensor: dec.weight is enc.weight (one trainable tensor, used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class _NoForwardMode(torch.autograd.Function):
    """tanh with a backward (and double backward) but no forward-mode rule."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoForwardNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_NoForwardMode.apply(self.fc1(x)))


def branchy_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A plug-in loss with data-dependent control flow: vmap cannot batch it (the per-sample loop is used)."""
    if float(outputs.detach().sum()) > 1e9:
        return outputs.sum()
    return F.cross_entropy(outputs, targets)


CASES = ["mlp", "cnn", "pool", "layernorm", "attention", "cnn-ce", "pool-ce", "batchnorm", "tied"]


def build(name: str, n: int = 12) -> Case:
    """The conftest cases, those with cross-entropy on log-softmax outputs, and BatchNorm, tied and linear models."""
    if name.endswith("-ce"):  # the same models with cross-entropy: the same GGN as with NLL (the softmax GGN)
        case = make_case(name[:-3], n)
        return Case(case.model, F.cross_entropy, case.inputs, case.targets)
    if name in ("mlp", "cnn", "pool", "layernorm", "attention"):
        return make_case(name, n)
    torch.manual_seed(1)
    x = torch.randn(n, 4, dtype=torch.float64)
    if name == "batchnorm":
        return Case(BatchNormNet().double().eval(), F.cross_entropy, x, torch.randint(0, 3, (n,)))
    if name == "tied":
        return Case(TiedNet().double(), F.cross_entropy, x, torch.randint(0, 4, (n,)))
    if name == "linear":
        return Case(nn.Linear(4, 3).double(), F.mse_loss, x, torch.randn(n, 3, dtype=torch.float64))
    if name == "heads":
        return Case(TwoHeads().double(), F.mse_loss, x, torch.randn(n, 5, dtype=torch.float64))
    if name == "mse-onehot":
        return Case(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), mse, x,
                    torch.randint(0, 3, (n,)))
    if name == "branchy":
        return Case(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), branchy_loss, x,
                    torch.randint(0, 3, (n,)))
    if name == "noforward":
        return Case(NoForwardNet().double(), F.cross_entropy, x, torch.randint(0, 3, (n,)))
    raise KeyError(name)


# --- dense references (reverse mode only) -------------------------------------------------------------


def _flat(model: nn.Module) -> tuple[list[str], list[torch.Size], list[slice], torch.Tensor]:
    named = trainable(model)
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    slices, start = [], 0
    for s in shapes:
        slices.append(slice(start, start + s.numel()))
        start += s.numel()
    return names, shapes, slices, torch.cat([p.detach().reshape(-1) for _, p in named])


def _outputs_fn(model: nn.Module, x: torch.Tensor):
    names, shapes, slices, _ = _flat(model)

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        params = {n: flat[sl].reshape(sh) for n, sl, sh in zip(names, slices, shapes)}
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(model, params, (x,))

    return outputs


def dense_ggn(case: Case, batches: list) -> torch.Tensor:
    """Σ_b w_b J_bᵀ H_z J_b: J_b by reverse-mode jacobian, H_z by the dense Hessian of the loss in z."""
    flat0 = _flat(case.model)[3]
    N = sum(len(y) for _, y in batches)
    G = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    for x, y in batches:
        f = _outputs_fn(case.model, x)
        z = f(flat0).detach()
        J = torch.autograd.functional.jacobian(f, flat0).reshape(z.numel(), -1)
        if case.loss_fn is F.nll_loss:  # log-probabilities: the softmax GGN, written as J_zᵀ diag(p) J_z / n_b
            Hz = torch.diag(z.exp().reshape(-1)) / len(y)
        else:
            Hz = torch.autograd.functional.hessian(lambda zz: case.loss_fn(zz, y), z).reshape(z.numel(), z.numel())
        G += len(y) / N * J.T @ Hz @ J
    return G


def dense_fisher(case: Case, batches: list) -> torch.Tensor:
    """(1/N) Σ_n ∇ℓ_n∇ℓ_nᵀ from per-sample gradients, one backward per sample."""
    flat0 = _flat(case.model)[3]
    N = sum(len(y) for _, y in batches)
    Fm = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    for x, y in batches:
        for n in range(len(y)):
            flat = flat0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(case.loss_fn(_outputs_fn(case.model, x[n:n + 1])(flat), y[n:n + 1]), flat)
            Fm += torch.outer(g, g) / N
    return Fm


@functools.lru_cache(maxsize=None)
def reference(name: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(C, g): the dense curvature of kind `kind` and the gradient of case `name` (12 samples, one batch)."""
    case = build(name)
    case.model.eval()
    batches = case.batches()
    C = dense_ggn(case, batches) if kind == "ggn" else dense_fisher(case, batches)
    flat = _flat(case.model)[3].clone().requires_grad_(True)
    loss = case.loss_fn(_outputs_fn(case.model, case.inputs)(flat), case.targets)
    (g,) = torch.autograd.grad(loss, flat)
    return C.numpy(), g.numpy()


def projector(part: Partition, g: np.ndarray) -> np.ndarray:
    """P (P × S): column s is U_s, the gradient restricted to the scalars of group s."""
    ids = np.concatenate([a.reshape(-1).numpy() if isinstance(a, torch.Tensor) else np.full(n, a)
                          for a, n in zip(part.assignment, _NUMEL[part.tensor_names])])
    P = np.zeros((len(g), part.size))
    P[np.arange(len(g)), ids] = g
    return P


_NUMEL: dict[tuple[str, ...], list[int]] = {}


def partition(model: nn.Module, kind: str = "canonical") -> Partition:
    part = make_partition(model, kind)
    _NUMEL[part.tensor_names] = [p.numel() for _, p in trainable(model)]
    return part


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def operator(kind: str, case: Case, sizes: list[int] | None = None, jacobian: str = "auto",
             **kwargs: object) -> OutputSpaceOperator:
    op = OPERATORS[kind].create(case.model, case.loss_fn, case.batches(sizes), **kwargs)
    op.jacobian = jacobian
    return op


# --- projections -------------------------------------------------------------------------------------


@pytest.mark.parametrize("jacobian", JACOBIANS[1:])
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("name", CASES)
def test_projection_matches_dense(name: str, kind: str, jacobian: str) -> None:
    case = build(name)
    C, g = reference(name, kind)
    part = partition(case.model)
    P = projector(part, g)
    res = operator(kind, case, [5, 7], jacobian).projection(part)
    expected = P.T @ C @ P
    assert rel(res.pseudo_hessian, expected) <= 1e-10
    assert rel(res.pseudo_gradient, P.T @ g) <= 1e-12
    assert res.curvature == kind and res.strategy == jacobian and res.n_batches == 2 and res.n_samples == 12
    assert np.array_equal(res.pseudo_hessian, res.pseudo_hessian.T)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("part_kind", ["canonical", "discrete"])
def test_auto_method(part_kind: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU: double-vjp for whole-tensor groups, forward mode for groups within tensors; elsewhere timed."""
    case = build("layernorm")
    C, g = reference("layernorm", kind)
    part = partition(case.model, part_kind)
    P = projector(part, g)
    res = operator(kind, case, [5, 7]).projection(part)
    assert res.strategy == ("double-vjp" if part_kind == "canonical" else "forward-mode")
    assert rel(res.pseudo_hessian, P.T @ C @ P) <= 1e-10
    monkeypatch.setattr(OPERATORS[kind], "device", property(lambda self: torch.device("meta")))
    timed = operator(kind, case, [5, 7]).projection(part)
    assert timed.strategy in JACOBIANS[1:]
    assert rel(timed.pseudo_hessian, P.T @ C @ P) <= 1e-10


@pytest.mark.parametrize("jacobian", JACOBIANS[1:])
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("part_kind", ["layer", "trivial", "discrete"])
def test_other_partitions(part_kind: str, kind: str, jacobian: str) -> None:
    name = "tied" if part_kind == "layer" else "mlp"
    case = build(name)
    C, g = reference(name, kind)
    part = partition(case.model, part_kind)
    res = operator(kind, case, [5, 7], jacobian).projection(part)
    if part_kind == "trivial":
        assert res.pseudo_hessian.shape == (1, 1)
        assert res.pseudo_hessian[0, 0] == pytest.approx(g @ C @ g, rel=1e-10)
    elif part_kind == "discrete":
        assert res.pseudo_hessian.shape == (len(g), len(g))
        assert rel(res.pseudo_hessian, np.diag(g) @ C @ np.diag(g)) <= 1e-10
    else:
        P = projector(part, g)
        assert rel(res.pseudo_hessian, P.T @ C @ P) <= 1e-10


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_forward_mode_in_small_chunks(kind: str) -> None:
    """A memory budget that fits a few tangents per vmapped pass gives the same projection."""
    case = build("mlp")
    C, g = reference("mlp", kind)
    op = operator(kind, case, [5, 7], "forward-mode", max_memory=20_000)
    res = op.projection(partition(case.model, "discrete"))
    assert 1 <= op._chunk(0, len(g)) < len(g)
    assert rel(res.pseudo_hessian, np.diag(g) @ C @ np.diag(g)) <= 1e-10


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_batching_invariance(kind: str) -> None:
    case = build("layernorm")
    part = partition(case.model)
    results = [operator(kind, case, sizes).projection(part) for sizes in (None, [5, 7], [3, 4, 5])]
    for res in results[1:]:
        assert rel(res.pseudo_hessian, results[0].pseudo_hessian) <= 1e-12
        assert rel(res.pseudo_gradient, results[0].pseudo_gradient) <= 1e-12
    assert np.isnan(results[0].pseudo_hessian_stderr).all()
    assert np.isfinite(results[2].pseudo_hessian_stderr).all()


# --- products --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cached", "streamed"])
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("name", ["mlp", "layernorm", "attention", "batchnorm", "tied", "pool-ce"])
def test_products_match_dense(name: str, kind: str, mode: str) -> None:
    case = build(name)
    C = reference(name, kind)[0]
    op = operator(kind, case, [5, 7], max_memory=2 ** 40 if mode == "cached" else 0)
    v = torch.randn(C.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = op.operator(None).matvec(v)
    assert op.mode == mode
    assert rel(out.numpy(), C @ v.numpy()) <= 1e-10
    V = torch.randn(C.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert rel(op.operator(None).matmat(V).numpy(), C @ V.numpy()) <= 1e-10
    assert op.count == 4


@pytest.mark.parametrize("mode", ["cached", "streamed"])
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_block_products_match_dense_blocks(kind: str, mode: str) -> None:
    case = build("cnn-ce")
    C = reference("cnn-ce", kind)[0]
    op = operator(kind, case, [5, 7], max_memory=2 ** 40 if mode == "cached" else 0)
    _, _, slices, _ = _flat(case.model)
    names = op.names
    gen = torch.Generator().manual_seed(5)
    for group, members in (("fc.weight", ["fc.weight"]), ("fc", ["fc.weight", "fc.bias"]),
                           ("conv.bias", ["conv.bias"])):
        idx = np.concatenate([np.arange(C.shape[0])[slices[names.index(m)]] for m in members])
        block = op.operator(group)
        assert block.dim == len(idx)
        v = torch.randn(block.dim, dtype=torch.float64, generator=gen)
        assert rel(block.matvec(v).numpy(), C[np.ix_(idx, idx)] @ v.numpy()) <= 1e-10
        V = torch.randn(block.dim, 2, dtype=torch.float64, generator=gen)
        assert rel(block.matmat(V).numpy(), C[np.ix_(idx, idx)] @ V.numpy()) <= 1e-10


def test_ggn_of_nll_on_log_probabilities_is_the_softmax_ggn() -> None:
    """NLL on log-softmax outputs: G is the GGN with respect to the logits, Jᵀ(diag p − ppᵀ)J, the same as with
    cross-entropy, and not the zero matrix NLL's own (linear) output Hessian would give."""
    nll, ce = build("cnn"), build("cnn-ce")
    C_nll, C_ce = reference("cnn", "ggn")[0], reference("cnn-ce", "ggn")[0]
    assert np.abs(C_nll).max() > 0 and rel(C_nll, C_ce) <= 1e-12  # the identity, between two dense formulas
    v = torch.randn(C_nll.shape[0], dtype=torch.float64)
    for case in (nll, ce):
        op = operator("ggn", case, [5, 7])
        assert rel(op.operator(None).matvec(v).numpy(), C_nll @ v.numpy()) <= 1e-10


def test_ggn_of_a_loss_linear_in_the_outputs_is_zero() -> None:
    """∇²_z L = 0 (here NLL on outputs that are not log-probabilities): G = 0, found without forming a Jacobian."""
    case = build("mlp")
    case = Case(case.model, lambda z, y: F.nll_loss(z, y), case.inputs, case.targets)  # not F.nll_loss itself
    op = operator("ggn", case, [5, 7])
    v = torch.randn(sum(p.numel() for p in case.model.parameters()), dtype=torch.float64)
    assert op.operator(None).matvec(v).abs().max() == 0
    assert op._zero_at_0  # found on batch 0: no Jacobian is formed
    for jacobian in JACOBIANS[1:]:  # and by the definition, when D is formed
        op = operator("ggn", case, [5, 7], jacobian)
        op._zero_at_0 = False
        assert np.abs(op.projection(partition(case.model)).pseudo_hessian).max() == 0


def test_nan_and_misshapen_outputs_are_refused() -> None:
    case = build("mlp")
    with torch.no_grad():
        case.model[0].weight[0, 0] = float("nan")
    for kind in OPERATORS:
        with pytest.raises(CurvscopeError, match="nan"):
            operator(kind, case, [5, 7]).operator(None).matvec(torch.ones(43, dtype=torch.float64))
    case = build("mlp")
    transposed = Case(nn.Sequential(case.model, Transpose()), lambda z, y: F.cross_entropy(z.T, y), case.inputs,
                      case.targets)
    with pytest.raises(CurvscopeError, match="dimension 0"):
        operator("fisher", transposed, [5, 7]).projection(partition(transposed.model))


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.T


# --- identities ------------------------------------------------------------------------------------------


def matrix(op: OutputSpaceOperator) -> np.ndarray:
    full = op.operator(None)
    return full.matmat(torch.eye(full.dim, dtype=torch.float64)).numpy()


@pytest.mark.parametrize("name", ["linear", "heads"])
def test_ggn_is_hessian_for_models_linear_in_parameters(name: str) -> None:
    case = build(name)
    H = dense(case, case.batches([5, 7])).hessian.numpy()
    G = matrix(operator("ggn", case, [5, 7]))
    assert rel(G, H) <= 1e-12
    part = partition(case.model)
    gbar = operator("ggn", case, [5, 7]).projection(part).pseudo_hessian
    hbar = HessianOperator.create(case.model, case.loss_fn, case.batches([5, 7])).projection(part).pseudo_hessian
    assert rel(gbar, hbar) <= 1e-12


@pytest.mark.parametrize("name", ["mlp", "batchnorm", "tied"])
def test_ggn_and_fisher_are_positive_semidefinite(name: str) -> None:
    """Cross-entropy is convex in z, so G ⪰ 0; F is a sum of outer products; so are Ḡ and F̄ (any partition)."""
    case = build(name)
    for kind in ("ggn", "fisher"):
        C = matrix(operator(kind, case, [5, 7]))
        assert np.abs(C - C.T).max() <= 1e-12 * np.abs(C).max()
        eig = np.linalg.eigvalsh(0.5 * (C + C.T))
        assert eig.min() >= -1e-12 * eig.max()
        assert rel(C, reference(name, kind)[0]) <= 1e-10
        part = partition(case.model, "discrete" if name == "mlp" else "canonical")
        eig = np.linalg.eigvalsh(operator(kind, case, [5, 7]).projection(part).pseudo_hessian)
        assert eig.min() >= -1e-12 * eig.max()


# --- losses, fallbacks, bookkeeping ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mse-onehot", "branchy"])
def test_fisher_of_loss_functions_vmap_cannot_batch(name: str) -> None:
    """The per-sample losses of a loss vmap cannot batch are evaluated sample by sample: same F̄."""
    case = build(name)
    C, g = reference(name, "fisher")
    part = partition(case.model)
    P = projector(part, g)
    for jacobian in JACOBIANS[1:]:
        op = operator("fisher", case, [5, 7], jacobian)
        assert rel(op.projection(part).pseudo_hessian, P.T @ C @ P) <= 1e-10
    if name == "branchy":
        assert op._vmapped is False


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_model_without_forward_mode_falls_back_to_double_vjp(kind: str) -> None:
    case = build("noforward")
    C, g = reference("noforward", kind)
    part = partition(case.model, "discrete")  # where auto would use forward mode
    res = operator(kind, case, [5, 7]).projection(part)
    assert res.strategy == "double-vjp"
    assert rel(res.pseudo_hessian, np.diag(g) @ C @ np.diag(g)) <= 1e-10
    with pytest.raises(CurvscopeError, match="forward-mode"):
        operator(kind, case, [5, 7], "forward-mode").projection(part)
    op = operator(kind, case, [5, 7], max_memory=0)  # streamed products try forward mode first
    v = torch.randn(C.shape[0], dtype=torch.float64)
    assert rel(op.operator(None).matvec(v).numpy(), C @ v.numpy()) <= 1e-10
    assert op._forward_fails


def test_float32_compute_is_close_to_float64() -> None:
    case = build("layernorm")
    part = partition(case.model)
    exact = GGNOperator.create(case.model, case.loss_fn, case.batches()).projection(part).pseudo_hessian
    approx = GGNOperator.create(case.model, case.loss_fn, case.batches(),
                                dtype=torch.float32).projection(part).pseudo_hessian
    assert approx.dtype == np.float64
    assert 0 < rel(approx, exact) <= 1e-4
    assert next(case.model.parameters()).dtype == torch.float64


def test_kinds_methods_and_training_mode() -> None:
    assert GGNOperator.kind is KINDS["ggn"] and FisherOperator.kind is KINDS["fisher"]
    assert GGNOperator.method == FisherOperator.method == "forward-mode"
    case = build("batchnorm")
    case.model.train()
    op = FisherOperator.create(case.model, case.loss_fn, case.batches())
    assert not case.model.training
    op.close()
    assert case.model.training
    case.model.eval()
    with pytest.raises(CurvscopeError, match="Hessian"):
        operator("ggn", case).projection(partition(case.model), strategy="batched")
