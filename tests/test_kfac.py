"""K-FAC (curvscope.curvature.kfac) against dense, independent float64 references.

The factors are rebuilt here without the engine's machinery: convolution patches by explicit indexing (not
``unfold``; each patch matrix is checked to reproduce the layer's own output), per-sample output Hessians by
``torch.autograd.functional.hessian`` (reverse-over-reverse), Jacobians of the outputs with respect to a layer's
output by ``torch.autograd.functional.jacobian`` of a perturbation added to it, and per-sample gradients by one
backward pass per sample. Then

- A = 1/(N R) Σ_n Σ_t ã ãᵀ and B = 1/N Σ_n Σ_t J_tᵀ Λ_n J_t (type-2) or 1/N Σ_n Σ_t g_t g_tᵀ (empirical), per
  group of channels, on Linear layers (vectors and sequences) and Conv2d layers (stride, padding, dilation,
  groups, no bias, reflect padding, ``padding="same"``), independently of how the samples are cut into batches;
  also per-position outputs, a frozen bias and an in-place activation, and the ``reduce`` approximation
  (positions averaged on the input side, summed on the output side);
- K-FAC is exact where it should be (a linear model under MSE; one sample of one linear layer, empirical;
  ``reduce`` on a bias-bias block);
- K̄ = UᵀKU from the factors equals the dense product with K built from them (see dense_kfac for the layout), on
  three partitions, with the LayerNorm kept exact (C̄'s entries, nothing across blocks);
- the Monte-Carlo flavour is seeded and converges to type-2; refusals are CurvscopeError; layers called twice,
  tied or never called as modules are kept exact;
- curvlinops' KFACLinearOperator (when installed) gives the same dense matrix.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import AttentionNet, TwoHeads
from torch import nn

from curvscope.curvature.kfac import KFAC, kfac
from curvscope.curvature.operator import full_gradient
from curvscope.curvature.partition import make_partition
from curvscope.curvature.registry import curvature_operator
from curvscope.errors import CurvscopeError
from curvscope.sources.losses import LOSSES

# PyTorch's note that an uneven padding="same" (even kernel, odd dilation) pads a copy of the input: wanted here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

N = 7  # samples of the analysis set
SPLITS = [[4, 3], [7], [2, 2, 2, 1]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread (on a busy machine, a second thread's barrier costs
    milliseconds per float64 convolution)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- models ------------------------------------------------------------------------------------------


class ConvHead(nn.Module):
    """One Conv2d (any configuration) → tanh → flatten → Linear to 3 outputs."""

    def __init__(self, conv: nn.Conv2d, features: int) -> None:
        super().__init__()
        self.conv = conv
        self.fc = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class SequenceNet(nn.Module):
    """Linear on (n, T, 3) → tanh → Linear on (n, T, 4) → mean over T: two Linear layers with R = T positions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))).mean(1)


class NormCNN(nn.Module):
    """Conv2d (2 groups) → tanh → flatten → LayerNorm → Linear: two K-FAC layers and one tensor pair kept exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():  # affine terms away from (1, 0), so that the LayerNorm block is generic
            self.norm.weight.add_(0.3 * torch.randn(16))
            self.norm.bias.add_(0.3 * torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.tanh(self.conv(x)).flatten(1)))


class TwiceNet(nn.Module):
    """fc1 → tanh → shared (called twice, tanh between) → fc2: `shared` has no K-FAC rule."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


class TiedNet(nn.Module):
    """enc → tanh → dec → tanh → head, with dec.weight the same tensor as enc.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class TokenNet(nn.Module):
    """A per-position classifier: (n, T, 3) → Linear → tanh → Linear → scores (n, 4, T), one output per position."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))).transpose(1, 2)


class InPlaceCNN(nn.Module):
    """Conv2d → ReLU(inplace=True) → flatten → Linear: the conv's output is overwritten after its hook ran."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(27, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def build(name: str, n: int = N, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A float64 model with 3 outputs per sample and n inputs for it."""
    torch.manual_seed(seed)
    if name == "linear":
        model, x = mlp(), torch.randn(n, 4)
    elif name == "sequence":
        model, x = SequenceNet(), torch.randn(n, 5, 3)
    elif name == "conv-grouped":  # 7x7 → floor((7 + 2 − 4 − 1)/2) + 1 = 3x3
        model, x = ConvHead(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), 6 * 3 * 3), \
            torch.randn(n, 4, 7, 7)
    elif name == "conv-nobias":
        model, x = ConvHead(nn.Conv2d(2, 3, 3, bias=False), 3 * 3 * 3), torch.randn(n, 2, 5, 5)
    elif name == "conv-reflect":  # 5x5 padded (2, 1) by reflection, stride (1, 2) → 7x3
        model, x = ConvHead(nn.Conv2d(2, 3, 3, stride=(1, 2), padding=(2, 1), padding_mode="reflect"), 3 * 7 * 3), \
            torch.randn(n, 2, 5, 5)
    elif name == "conv-same":  # kernel (4, 2), dilation (1, 2): padding (1, 2) rows (uneven), (1, 1) columns
        model, x = ConvHead(nn.Conv2d(2, 3, (4, 2), padding="same", dilation=(1, 2)), 3 * 5 * 6), \
            torch.randn(n, 2, 5, 6)
    elif name == "conv-inplace":
        model, x = InPlaceCNN(), torch.randn(n, 2, 5, 5)
    elif name == "frozen-bias":  # the first layer's bias is not trainable: A has no bias row there
        model, x = mlp(), torch.randn(n, 4)
        model[0].bias.requires_grad_(False)
    elif name == "tokens":
        model, x = TokenNet(), torch.randn(n, 5, 3)
    elif name == "norm-cnn":
        model, x = NormCNN(), torch.randn(n, 2, 4, 4)
    elif name == "heads":
        model, x = TwoHeads(), torch.randn(n, 4)
    else:
        raise KeyError(name)
    return model.double().eval(), x.double()


def targets(loss: str, n: int = N, outputs: int = 3, seed: int = 1, positions: int | None = None) -> torch.Tensor:
    """Class labels for cross_entropy/nll, float targets for the others (per position when `positions`)."""
    g = torch.Generator().manual_seed(seed)
    tail = () if positions is None else (positions,)
    if loss in ("cross_entropy", "nll"):
        return torch.randint(0, outputs, (n,) + tail, generator=g)
    return torch.randn((n, outputs) + tail, generator=g, dtype=torch.float64)


TARGETS = {"tokens": {"outputs": 4, "positions": 5}}  # the models whose outputs are not 3 per sample


def wavy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user's batch-mean loss with an indefinite, non-diagonal per-sample output Hessian
    (diag(−y sin z) + 0.2·11ᵀ): type-2 K-FAC backpropagates vectors of both signs."""
    return ((torch.sin(z) * y).sum(1) + 0.1 * z.sum(1) ** 2).mean()


def loss_function(loss: str):
    return wavy if loss == "wavy" else LOSSES[loss]


def batches_of(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


def engine(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor, curvature: str, flavour: str | None = None,
           sizes: list[int] | None = None, **kwargs) -> KFAC:
    """The engine's K-FAC of `model` on (x, y) cut into batches of `sizes`."""
    with curvature_operator(model, loss_function(loss), batches_of(x, y, sizes or [len(y)]), curvature) as op:
        return kfac(op, flavour, **kwargs)


def assert_relative(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, tol: float,
                    what: str = "") -> None:
    """max |actual − expected| ≤ tol · max |expected| (relative to the largest entry)."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shapes {a.shape} and {e.shape}"
    err, scale = float(np.abs(a - e).max()), float(np.abs(e).max())
    assert scale > 0 and err <= tol * scale, f"{what}: max error {err:.3e} (largest entry {scale:.3e})"


def assert_close(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, tol: float = 1e-10,
                 what: str = "") -> None:
    """max |actual − expected| ≤ tol · max(1, max |expected|)."""
    a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(e.shape)}"
    err, scale = float((a - e).abs().max()) if a.numel() else 0.0, max(1.0, float(e.abs().max()) if e.numel() else 0)
    assert err <= tol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"


# --- dense, independent references -------------------------------------------------------------------


def _same_padding(kernel: int, dilation: int) -> tuple[int, int]:
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def _source(i: int, size: int, mode: str) -> int | None:
    """Where padded index i (may be out of range) reads the input, or None for a zero."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -i if i < 0 else 2 * (size - 1) - i
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    if mode == "circular":
        return i % size
    raise ValueError(mode)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(n, R, C_in·kh·kw) by indexing: position t = i·W_out + j, column c·kh·kw + a·kw + b reads
    x[c, i·s_h + a·d_h − p_top, j·s_w + b·d_w − p_left] (padding by `padding_mode`)."""
    n, C, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        (pt, pb), (pl, pr) = _same_padding(kh, dh), _same_padding(kw, dw)
    elif conv.padding == "valid":
        pt = pb = pl = pr = 0
    else:
        (pt, pl), (pb, pr) = conv.padding, conv.padding
    Ho, Wo = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1, (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = x.new_zeros(n, Ho * Wo, C * kh * kw)
    channels = torch.arange(C) * kh * kw
    for i in range(Ho):
        for j in range(Wo):
            for a in range(kh):
                r = _source(i * sh + a * dh - pt, H, conv.padding_mode)
                for b in range(kw):
                    c = _source(j * sw + b * dw - pl, W, conv.padding_mode)
                    if r is not None and c is not None:
                        out[:, i * Wo + j, channels + a * kw + b] = x[:, :, r, c]
    return out


def _per_position(module: nn.Module, t: torch.Tensor, lead: int) -> torch.Tensor:
    """A tensor shaped like the layer's output of one sample, with `lead` leading dimensions, as (lead, R, d_out)."""
    if isinstance(module, nn.Conv2d):  # (lead, C_out, H_out, W_out) → (lead, R, C_out)
        return t.reshape(lead, module.out_channels, -1).transpose(1, 2)
    return t.reshape(lead, -1, module.out_features)


def reference_factors(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, name: str, flavour: str,
                      approximation: str = "expand") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A and B of layer `name`, per group of channels, from explicit loops over the samples.

    ``reduce`` first averages the inputs over the positions (ã_n = 1/R Σ_t ã_{n,t}, then the bias 1) and sums the
    backpropagated vectors over them (g_n = Σ_t g_{n,t}, i.e. J = Σ_t J_t), with R = 1 in the normalisation."""
    reduce = approximation == "reduce"
    module = dict(model.named_modules())[name]
    groups = getattr(module, "groups", 1)
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].detach().clone(),
                                                                            out=out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    n = x.shape[0]
    d_out = module.weight.shape[0]
    bias = module.bias is not None and module.bias.requires_grad  # a frozen bias is no column of [W | b]
    if isinstance(module, nn.Conv2d):
        a = conv_patches(module, seen["inp"])
        # the patches reproduce the convolution: s_{n,t} = W_g ã_{n,t,g} + b_g per group
        w = module.weight.detach().reshape(d_out, -1)
        rebuilt = torch.cat([p @ wg.T for p, wg in zip(a.chunk(groups, 2), w.chunk(groups, 0))], 2)
        if module.bias is not None:
            rebuilt = rebuilt + module.bias.detach()
        assert_close(rebuilt, _per_position(module, seen["out"], n), 1e-12, "patches")
    else:
        a = seen["inp"].reshape(n, -1, module.in_features)
    if reduce:
        a = a.mean(1, keepdim=True)
    R = a.shape[1]
    A = []
    for chunk in a.chunk(groups, 2):
        if bias:
            chunk = torch.cat([chunk, torch.ones(n, R, 1, dtype=chunk.dtype)], 2)
        A.append(torch.einsum("nti,ntj->ij", chunk, chunk) / (n * R))

    B = torch.zeros(d_out, d_out, dtype=torch.float64)
    for i in range(n):
        xi, yi = x[i:i + 1], y[i:i + 1]

        def outputs(delta: torch.Tensor) -> torch.Tensor:
            """z_i as a function of a perturbation of the layer's output s_i."""
            h = module.register_forward_hook(lambda m, args, out: out + delta)
            try:
                return model(xi)
            finally:
                h.remove()

        delta0 = torch.zeros_like(seen["out"][i:i + 1])
        if flavour == "type-2":
            z = outputs(delta0).detach()
            C = z.numel()
            J = torch.autograd.functional.jacobian(outputs, delta0).reshape(C, *delta0.shape[1:])
            Jt = _per_position(module, J, C).transpose(0, 1)  # (R, C, d_out): ∂z_i/∂s_{i,t}
            if reduce:
                Jt = Jt.sum(0, keepdim=True)
            lam = torch.autograd.functional.hessian(lambda zz: loss_fn(zz, yi), z).reshape(C, C)
            B += torch.einsum("tci,cd,tdj->ij", Jt, lam, Jt)
        else:  # empirical: g_t = ∂ℓ_i/∂s_{i,t}, ℓ_i the loss of sample i alone
            d = delta0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(outputs(d), yi), d)
            g = _per_position(module, g, 1)[0]
            if reduce:
                g = g.sum(0, keepdim=True)
            B += g.T @ g
    B /= n
    rows = d_out // groups
    return A, [B[k * rows:(k + 1) * rows, k * rows:(k + 1) * rows] for k in range(groups)]


def flat_offsets(params: list[torch.Tensor]) -> list[int]:
    out, start = [], 0
    for p in params:
        out.append(start)
        start += p.numel()
    return out + [start]


def dense_kfac(k: KFAC, params: list[torch.Tensor]) -> torch.Tensor:
    """K = blockdiag(A_l ⊗ B_l) as a P × P matrix on the flat vector of the trainable tensors (each flattened row-major,
    in order); rows and columns of tensors without a rule are zero.

    On M = [W.reshape(d_out, −1) | b], K M = B M A per group of rows. Row-major, vec(B M A) = (B ⊗ Aᵀ) vec(M) =
    (B ⊗ A) vec(M): entry (i, j) of M sits at i·width + j of vec(M), and at weight offset + i·cols + j (j < cols)
    or bias offset + i (j = cols) of the flat vector. The groups are consecutive blocks of rows of M.
    """
    offsets = flat_offsets(params)
    K = torch.zeros(offsets[-1], offsets[-1], dtype=torch.float64)
    for lay in k.layers:
        w = params[lay.weight]
        d_out, cols = w.shape[0], w[0].numel()
        index = torch.empty(d_out, cols + (lay.bias is not None), dtype=torch.long)
        index[:, :cols] = offsets[lay.weight] + torch.arange(d_out * cols).reshape(d_out, cols)
        if lay.bias is not None:
            index[:, cols] = offsets[lay.bias] + torch.arange(d_out)
        rows = d_out // lay.groups
        for g in range(lay.groups):
            ids = index[g * rows:(g + 1) * rows].reshape(-1)
            K[ids[:, None], ids[None, :]] = torch.kron(lay.B[g], lay.A[g])
    return K


def dense_u(part, u: list[torch.Tensor]) -> torch.Tensor:
    """U (P × S): U[p, s] = u_p when scalar p belongs to group s, 0 otherwise."""
    ids = torch.cat([torch.full((t.numel(),), a) if isinstance(a, int) else a.reshape(-1)
                     for a, t in zip(part.assignment, u)])
    flat = torch.cat([t.reshape(-1) for t in u])
    U = torch.zeros(len(flat), part.size, dtype=torch.float64)
    U[torch.arange(len(flat)), ids] = flat
    return U


# --- 1. factors against the dense reference -------------------------------------------------------------

FACTOR_MODELS = ["linear", "sequence", "tokens", "frozen-bias", "conv-grouped", "conv-nobias", "conv-reflect",
                 "conv-same", "conv-inplace"]
FACTOR_FLAVOURS = [("ggn", "cross_entropy", "type-2"), ("ggn", "mse", "type-2"), ("ggn", "wavy", "type-2"),
                   ("fisher", "cross_entropy", "empirical"), ("fisher", "mse", "empirical")]


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("curvature,loss,flavour", FACTOR_FLAVOURS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", FACTOR_MODELS)
def test_factors_match_dense_reference(name: str, curvature: str, loss: str, flavour: str, approximation: str
                                       ) -> None:
    """Every layer's A_g = 1/(N R) Σ ã ãᵀ and B_g = 1/N Σ J_tᵀ Λ_n J_t (type-2, Λ_n of either sign for the user's
    `wavy` loss) or 1/N Σ g_t g_tᵀ (empirical) equal the dense loops, on 7 samples cut 4 + 3 (and their ``reduce``
    forms); every Linear and Conv2d has its rule and nothing is exact. Also: per-position outputs (tokens), a
    frozen bias (no bias row in A), an in-place activation after a Conv2d."""
    model, x = build(name)
    y = targets(loss, **TARGETS.get(name, {}))
    k = engine(model, loss, x, y, curvature, flavour, sizes=[4, 3], approximation=approximation)
    assert k.flavour == flavour and k.approximation == approximation and k.n_samples == N and k.exact == []
    expected = {n: "conv2d" if isinstance(m, nn.Conv2d) else "linear" for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert {lay.layer: lay.rule for lay in k.layers} == expected
    for lay in k.layers:
        A, B = reference_factors(model, loss_function(loss), x, y, lay.layer, flavour, approximation)
        assert lay.groups == len(A) == len(lay.A) == len(lay.B)
        for g in range(lay.groups):
            assert_relative(lay.A[g], A[g], 1e-12, f"{lay.layer} A[{g}]")
            assert_relative(lay.B[g], B[g], 1e-10, f"{lay.layer} B[{g}]")


@pytest.mark.parametrize("curvature,loss,flavour", [("ggn", "cross_entropy", "type-2"),
                                                    ("fisher", "mse", "empirical"),
                                                    ("ggn", "cross_entropy", "mc")], ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["sequence", "conv-grouped"])
def test_factors_do_not_depend_on_batches(name: str, curvature: str, loss: str, flavour: str) -> None:
    """A and B are the same for the 7 samples as 4 + 3, 7 and 2 + 2 + 2 + 1 (for mc: with the same draws, which
    depend on the batches, so only A is compared there)."""
    model, x = build(name)
    y = targets(loss)
    runs = [engine(model, loss, x, y, curvature, flavour, sizes=s) for s in SPLITS]
    for k in runs[1:]:
        for lay, ref in zip(k.layers, runs[0].layers):
            for g in range(lay.groups):
                assert_relative(lay.A[g], ref.A[g], 1e-13, f"{lay.layer} A[{g}]")
                if flavour != "mc":
                    assert_relative(lay.B[g], ref.B[g], 1e-12, f"{lay.layer} B[{g}]")


# --- 2. where K-FAC is exact ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["canonical", "layer", "discrete"])
def test_exact_for_linear_heads_under_mse(kind: str) -> None:
    """Two independent linear heads under MSE: Λ = (2/D) I and J_s constant, so G = blockdiag(A ⊗ B) and K̄ = Ḡ
    (to 1e-12, relative), with every group under a rule."""
    model, x = build("heads")
    y = targets("mse", outputs=5)
    with curvature_operator(model, LOSSES["mse"], batches_of(x, y, [4, 3]), "ggn") as op:
        k = kfac(op)
        part = make_partition(model, kind)
        gradient = full_gradient(op.obj, op.params)
        gbar = op.projection(part, gradient=gradient).pseudo_hessian
        kbar, rules = k.projection(part, gradient[0], gbar)
    assert set(rules) == {"linear"}
    assert_relative(kbar, gbar, 1e-12, "K̄ vs Ḡ")


@pytest.mark.parametrize("kind", ["canonical", "layer", "discrete"])
def test_exact_for_one_sample_of_one_layer_empirical(kind: str) -> None:
    """One nn.Linear (the root module) on one sample: ∇ℓ = ã ⊗ g, so F = ããᵀ ⊗ ggᵀ = A ⊗ B exactly. The dense K built
    from the factors equals the dense ∇ℓ∇ℓᵀ, and K̄ = F̄ (to 1e-12, relative)."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), targets("cross_entropy", n=1)
    with curvature_operator(model, LOSSES["cross_entropy"], [(x, y)], "fisher") as op:
        k = kfac(op)
        assert k.flavour == "empirical" and [lay.layer for lay in k.layers] == [""]
        part = make_partition(model, kind)
        gradient = full_gradient(op.obj, op.params)
        fbar = op.projection(part, gradient=gradient).pseudo_hessian
        kbar, rules = k.projection(part, gradient[0], fbar)
        K = dense_kfac(k, op.params)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(F.linear(x, *params), y), params)])
    assert_relative(K, torch.outer(g, g), 1e-12, "K vs ∇ℓ∇ℓᵀ")
    assert set(rules) == {"linear"}
    assert_relative(kbar, fbar, 1e-12, "K̄ vs F̄")


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
@pytest.mark.parametrize("name", ["sequence", "cnn"])
def test_reduce_is_exact_on_the_bias_block(name: str, curvature: str) -> None:
    """With ``reduce``, K's bias-bias block is C's (J_b = Σ_t J_{s_t} and the bias input is 1 at every position): to
    1e-10 relative against the curvature operator's own block; ``expand`` divides the cross-position terms away,
    so it differs on a layer with several positions."""
    model, x = _cnn() if name == "cnn" else build(name)
    y = targets("cross_entropy")
    with curvature_operator(model, LOSSES["cross_entropy"], batches_of(x, y, [4, 3]), curvature) as op:
        offsets = flat_offsets(op.params)
        errors = {}
        for approximation in ("expand", "reduce"):
            k = kfac(op, approximation=approximation)
            K = dense_kfac(k, op.params)
            for lay in k.layers:
                d = op.params[lay.bias].numel()
                exact = op.operator(op.names[lay.bias]).matmat(torch.eye(d, dtype=torch.float64))
                at = slice(offsets[lay.bias], offsets[lay.bias + 1])
                errors[approximation, lay.layer] = float((K[at, at] - exact).abs().max() / exact.abs().max())
    assert max(e for (a, _), e in errors.items() if a == "reduce") <= 1e-10, errors
    assert max(e for (a, _), e in errors.items() if a == "expand") > 1e-3, errors


# --- 3. the projection against a dense K ---------------------------------------------------------------


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
@pytest.mark.parametrize("kind", ["canonical", "layer", "discrete"])
def test_projection_against_dense_k(kind: str, curvature: str) -> None:
    """K̄ = UᵀKU with K and U dense (K from the factors, see dense_kfac) on the Conv2d and Linear of NormCNN; the
    LayerNorm's groups have rule "exact", their entries among themselves are C̄'s and those with other layers 0.
    The dense K also agrees with KroneckerLayer.product, the operator K̄ is computed with."""
    model, x = build("norm-cnn")
    y = targets("cross_entropy")
    with curvature_operator(model, LOSSES["cross_entropy"], batches_of(x, y, [4, 3]), curvature) as op:
        k = kfac(op)
        part = make_partition(model, kind)
        gradient = full_gradient(op.obj, op.params)
        cbar = op.projection(part, gradient=gradient).pseudo_hessian
        kbar, rules = k.projection(part, gradient[0], cbar)
        K = dense_kfac(k, op.params)
        names = list(op.names)
        params = op.params
    assert k.exact == ["norm.weight", "norm.bias"]
    assert k.tensor_rules() == ["conv2d", "conv2d", "exact", "exact", "linear", "linear"]
    U = dense_u(part, gradient[0])
    expected = (U.T @ K @ U).numpy()
    norm = np.array([layer == "norm" for layer in part.layers])
    assert norm.any() and (~norm).any()
    expected[np.ix_(norm, norm)] = cbar[np.ix_(norm, norm)]
    assert [r == "exact" for r in rules] == list(norm)
    assert set(np.array(rules)[~norm]) == {"conv2d", "linear"}
    assert np.all(kbar[np.ix_(norm, ~norm)] == 0) and np.all(kbar[np.ix_(~norm, norm)] == 0)
    assert np.array_equal(kbar[np.ix_(norm, norm)], cbar[np.ix_(norm, norm)]), "LayerNorm block"
    assert_relative(kbar, expected, 1e-12, "K̄ vs UᵀKU")
    # the engine's operator on [V_W | v_b] against the dense matrix, for a random direction
    v = [torch.randn_like(p) for p in params]
    flat = torch.cat([t.reshape(-1) for t in v])
    offsets = flat_offsets(params)
    for lay in k.layers:
        kw, kb = lay.product(v[lay.weight], v[lay.bias])
        got = torch.cat([kw.reshape(-1), kb.reshape(-1)])
        want = K @ flat
        want = torch.cat([want[offsets[i]:offsets[i + 1]] for i in (lay.weight, lay.bias)])
        assert_close(got, want, 1e-12, f"{names[lay.weight]} product")


# --- 4. the Monte-Carlo flavour ------------------------------------------------------------------------


def test_mc_is_seeded() -> None:
    """The same seed gives identical factors (on the GGN's operator and the Fisher's alike: the draws depend on
    the model, the loss and the seed only), another seed other B factors; A never depends on the draws."""
    model, x = build("linear")
    y = targets("cross_entropy")
    first = engine(model, "cross_entropy", x, y, "ggn", "mc", sizes=[4, 3], mc_samples=2, seed=5)
    again = engine(model, "cross_entropy", x, y, "ggn", "mc", sizes=[4, 3], mc_samples=2, seed=5)
    fisher = engine(model, "cross_entropy", x, y, "fisher", "mc", sizes=[4, 3], mc_samples=2, seed=5)
    other = engine(model, "cross_entropy", x, y, "ggn", "mc", sizes=[4, 3], mc_samples=2, seed=6)
    assert (first.flavour, first.mc_samples, first.seed) == ("mc", 2, 5)
    for k in (again, fisher):
        for lay, ref in zip(k.layers, first.layers):
            assert torch.equal(lay.A[0], ref.A[0]) and torch.equal(lay.B[0], ref.B[0])
    for lay, ref in zip(other.layers, first.layers):
        assert torch.equal(lay.A[0], ref.A[0])
        assert not torch.allclose(lay.B[0], ref.B[0], rtol=1e-6, atol=0)


class LogSoftmaxMLP(nn.Module):
    """Linear → tanh → Linear → log_softmax: log-probabilities for the nll loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(torch.tanh(self.fc1(x))), dim=1)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "nll"])
def test_mc_converges_to_type2(loss: str) -> None:
    """With 3000 draws per sample, E_ŷ[∇ℓ∇ℓᵀ] = ∇²ℓ makes the MC B factors approach type-2's (within 5 %,
    Frobenius, per layer; for nll on log-probabilities, type-2 uses the softmax Hessian and MC draws ŷ ~ exp z:
    the same K-FAC); A is the same."""
    if loss == "nll":
        torch.manual_seed(0)
        model, x = LogSoftmaxMLP().double().eval(), torch.randn(N, 4, dtype=torch.float64)
    else:
        model, x = build("linear")
    y = targets(loss)
    exact = engine(model, loss, x, y, "ggn", "type-2")
    sampled = engine(model, loss, x, y, "ggn", "mc", mc_samples=3000, seed=1)  # one batch: 3000 backward passes
    for lay, ref in zip(sampled.layers, exact.layers):
        assert_relative(lay.A[0], ref.A[0], 1e-14, f"{lay.layer} A")
        err = float(torch.linalg.norm(lay.B[0] - ref.B[0]) / torch.linalg.norm(ref.B[0]))
        assert err < 0.05, f"{lay.layer}: MC B is {err:.1%} from type-2"


@pytest.mark.parametrize("loss", [
    "mse",
    "cross_entropy",
])
def test_mc_converges_to_type2_with_positions(loss: str) -> None:
    """Per-position outputs (TokenNet: scores (n, 4, T = 5)): the MC B still approaches type-2's (within 5 %)."""
    model, x = build("tokens")
    y = targets(loss, **TARGETS["tokens"])
    exact = engine(model, loss, x, y, "ggn", "type-2")
    sampled = engine(model, loss, x, y, "ggn", "mc", mc_samples=1500, seed=1)
    for lay, ref in zip(sampled.layers, exact.layers):
        err = float(torch.linalg.norm(lay.B[0] - ref.B[0]) / torch.linalg.norm(ref.B[0]))
        ratio = float(ref.B[0].trace() / lay.B[0].trace())
        assert err < 0.05, f"{lay.layer}: MC B is {err:.1%} from type-2 (trace ratio {ratio:.3f})"


def user_cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The built-in loss's value, but the user's own function: its predictive distribution is unknown."""
    return F.cross_entropy(z, y)


def test_mc_refuses_a_user_loss() -> None:
    """MC needs the predictive distribution of a built-in loss: a plain python loss is a CurvscopeError (its own
    flavour still works)."""
    model, x = build("linear")
    y = targets("cross_entropy")
    with curvature_operator(model, user_cross_entropy, [(x, y)], "ggn") as op:
        with pytest.raises(CurvscopeError, match="(?i)built-in loss"):
            kfac(op, "mc")
        assert kfac(op).flavour == "type-2"


# --- 5. refusals and layers kept exact -------------------------------------------------------------------


@pytest.mark.parametrize("flavour", [
    None, "type-2", "empirical", "mc",
])
def test_refuses_the_hessian(flavour: str | None) -> None:
    """K-FAC approximates the GGN or the empirical Fisher: the Hessian's operator is refused, whatever the flavour."""
    model, x = build("linear")
    y = targets("cross_entropy")
    with curvature_operator(model, LOSSES["cross_entropy"], [(x, y)], "hessian") as op:
        with pytest.raises(CurvscopeError, match="Hessian"):
            kfac(op, flavour)


@pytest.mark.parametrize("curvature,flavour,kwargs,message", [
    ("fisher", "type-2", {}, "GGN"),
    ("ggn", "empirical", {}, "empirical Fisher"),
    ("ggn", "type-3", {}, "approximates"),
    ("ggn", "mc", {"mc_samples": 0}, "Monte-Carlo sample"),
    ("fisher", None, {"mc_samples": -1}, "Monte-Carlo sample"),
    ("ggn", None, {"approximation": "squash"}, "approximation"),
])
def test_refusals(curvature: str, flavour: str | None, kwargs: dict, message: str) -> None:
    """The flavour of the other curvature, an unknown flavour or approximation, fewer than one MC sample."""
    model, x = build("linear")
    y = targets("cross_entropy")
    with curvature_operator(model, LOSSES["cross_entropy"], [(x, y)], curvature) as op:
        with pytest.raises(CurvscopeError, match=message):
            kfac(op, flavour, **kwargs)


def test_trivial_partition_is_refused() -> None:
    """K̄ needs every group within one block of K: the trivial partition's one group spans both layers."""
    model, x = build("linear")
    y = targets("cross_entropy")
    with curvature_operator(model, LOSSES["cross_entropy"], [(x, y)], "ggn") as op:
        k = kfac(op)
        part = make_partition(model, "trivial")
        gradient = full_gradient(op.obj, op.params)
        with pytest.raises(CurvscopeError, match="spans several blocks"):
            k.projection(part, gradient[0], np.ones((1, 1)))


def _exact_blocks(model: nn.Module, x: torch.Tensor, kept: list[str], ruled: dict[str, str]) -> None:
    """kfac keeps the tensors `kept` exact and gives the others their rules; on the layer and canonical partitions K̄
    holds C̄'s entries within each exact module, 0 between blocks, and UᵀKU on the factors' layers."""
    y = targets("cross_entropy", n=len(x))
    with curvature_operator(model, LOSSES["cross_entropy"], batches_of(x, y, [4, 3]), "ggn") as op:
        k = kfac(op)
        assert k.exact == kept
        assert {lay.layer: lay.rule for lay in k.layers} == ruled
        assert [r for n, r in zip(op.names, k.tensor_rules()) if n in kept] == ["exact"] * len(kept)
        gradient = full_gradient(op.obj, op.params)
        K = dense_kfac(k, op.params)
        for kind in ("canonical", "layer"):
            part = make_partition(model, kind)
            cbar = op.projection(part, gradient=gradient).pseudo_hessian
            kbar, rules = k.projection(part, gradient[0], cbar)
            U = dense_u(part, gradient[0])
            expected = (U.T @ K @ U).numpy()
            exact = np.array([r == "exact" for r in rules])
            owners = np.array([name.rsplit(".", 1)[0] if kind == "canonical" else name for name in part.names])
            same = (owners[:, None] == owners[None, :]) & exact[:, None] & exact[None, :]
            expected[same] = cbar[same]
            assert np.array_equal(kbar[same], cbar[same])
            assert np.all(kbar[exact[:, None] & ~same] == 0)
            assert_relative(kbar, expected, 1e-12, f"{kind} K̄")


def test_layer_called_twice_is_kept_exact() -> None:
    """A Linear called twice per forward pass has no rule: its weight and bias are exact, their block is C̄'s."""
    torch.manual_seed(0)
    _exact_blocks(TwiceNet().double(), torch.randn(N, 4, dtype=torch.float64), ["shared.weight", "shared.bias"],
                  {"fc1": "linear", "fc2": "linear"})


def test_tied_weight_is_kept_exact() -> None:
    """A Linear whose weight is another module's (tied) has no rule, nor has that other module: both are exact."""
    torch.manual_seed(0)
    model = TiedNet().double()
    assert [n for n, _ in model.named_parameters()] == ["enc.weight", "enc.bias", "dec.bias", "head.weight",
                                                         "head.bias"]
    _exact_blocks(model, torch.randn(N, 4, dtype=torch.float64), ["enc.weight", "enc.bias", "dec.bias"],
                  {"head": "linear"})


def test_linear_never_called_is_kept_exact() -> None:
    """MultiheadAttention's out_proj is an nn.Linear whose forward never runs: no factors, kept exact with the
    attention's own tensors (two exact blocks, by owning module)."""
    torch.manual_seed(0)
    _exact_blocks(AttentionNet().double(), torch.randn(N, 3, 4, dtype=torch.float64),
                  ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"],
                  {"fc": "linear"})


# --- 6. curvlinops ---------------------------------------------------------------------------------------


def _curvlinops_dense(model: nn.Module, loss_func: nn.Module, data: list, fisher_type: str, approximation: str
                      ) -> torch.Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(model, loss_func, params, data, fisher_type=fisher_type,
                                       kfac_approx=approximation, separate_weight_and_bias=False,
                                       check_deterministic=False)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)  # 6x6, stride 2, padding 1 → 3x3
    return ConvHead(nn.Conv2d(2, 3, 3, stride=2, padding=1), 27).double().eval(), torch.randn(N, 2, 6, 6).double()


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", ["linear", "sequence", "cnn"])
def test_matches_curvlinops(name: str, fisher_type: str, approximation: str) -> None:
    """curvlinops' KFACLinearOperator (CrossEntropyLoss, mean reduction; weight and bias joint, as here) as a dense
    matrix equals K built from our factors (to 1e-10 relative), over 7 samples cut 4 + 3. Both flatten each tensor
    row-major in parameters() order; both scale B by 1/N per sample's loss (curvlinops undoes the batch mean)."""
    pytest.importorskip("curvlinops")
    model, x = _cnn() if name == "cnn" else build(name)
    y = targets("cross_entropy")
    curvature = "ggn" if fisher_type == "type-2" else "fisher"
    ours = engine(model, "cross_entropy", x, y, curvature, sizes=[4, 3], approximation=approximation)
    assert ours.exact == []
    K = dense_kfac(ours, [p for p in model.parameters()])
    theirs = _curvlinops_dense(model, nn.CrossEntropyLoss(), batches_of(x, y, [4, 3]), fisher_type, approximation)
    assert_relative(K, theirs, 1e-10, "curvlinops")


def test_curvlinops_mse_conventions() -> None:
    """Under MSE (mean over all N·D values), curvlinops' type-2 K-FAC is ours, but its empirical one is D times
    ours: curvlinops scales the loss by √D before the empirical (and MC) backward pass, i.e. it takes the
    per-sample loss as Σ_d (z_d − y_d)², while our empirical Fisher is that of ℓ_n = mse on sample n alone."""
    pytest.importorskip("curvlinops")
    model, x = build("linear")
    y = targets("mse")
    data = batches_of(x, y, [4, 3])
    for curvature, fisher_type, factor in (("ggn", "type-2", 1.0), ("fisher", "empirical", 3.0)):
        K = dense_kfac(engine(model, "mse", x, y, curvature, sizes=[4, 3]), [p for p in model.parameters()])
        theirs = _curvlinops_dense(model, nn.MSELoss(), data, fisher_type, "expand")
        assert_relative(theirs, factor * K, 1e-10, fisher_type)


class _Doubled(torch.autograd.Function):
    """x ↦ 2x with a hand-written backward and no batching rule: type-2's vmapped backward pass cannot run
    through it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return 2 * x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.from_numpy(2 * g.detach().numpy())  # numpy: vmap cannot batch it


class DoubledNet(nn.Module):
    """Linear → a custom autograd Function → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(_Doubled.apply(self.fc1(x))))


def test_type2_without_batching_rule_backpropagates_vector_by_vector() -> None:
    """A backward formula without a batching rule makes the vmapped pass fail; one pass per output vector gives
    the dense reference's B (checked here against the same model written with 2 * x)."""
    torch.manual_seed(0)
    custom = DoubledNet().double()
    plain = copy.deepcopy(custom)
    plain.forward = lambda x: plain.fc2(torch.tanh(2 * plain.fc1(x)))  # type: ignore[method-assign]
    x = torch.randn(N, 4, dtype=torch.float64)
    y = targets("cross_entropy")
    a, b = engine(custom, "cross_entropy", x, y, "ggn"), engine(plain, "cross_entropy", x, y, "ggn")
    for la, lb in zip(a.layers, b.layers):
        assert_relative(la.B[0], lb.B[0], 1e-12, la.layer)
        assert_relative(la.A[0], lb.A[0], 1e-12, la.layer)


class SequenceLogits(nn.Module):
    """Linear on (n, T, 3) → (n, T, V = 4) logits: the sequence layout, targets (n, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_mc_on_sequence_logits_with_ignored_targets() -> None:
    """(n, T, V) logits with (n, T) targets, some -100: MC labels are drawn over V at counted positions only, and
    weighted by the counted positions per sample, so the MC B approaches type-2's (within 5 %)."""
    torch.manual_seed(0)
    model = SequenceLogits().double()
    x = torch.randn(N, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (N, 5))
    y[0, 1:] = -100
    y[3, :2] = -100
    exact = engine(model, "cross_entropy", x, y, "ggn", "type-2")
    sampled = engine(model, "cross_entropy", x, y, "ggn", "mc", mc_samples=3000, seed=1)
    ref = exact.layers[0].B[0]
    err = float(torch.linalg.norm(sampled.layers[0].B[0] - ref) / torch.linalg.norm(ref))
    assert err < 0.05, f"MC B is {err:.1%} from type-2"
