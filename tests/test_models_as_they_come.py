"""Models as they come (issue #16): dict, ModelOutput and tuple outputs, sequence logits with ignored targets,
non-finite mask buffers, tied weights, parameter kinds, BatchNorm with running or batch statistics, and the
groups that make C̄ singular. Every curvature is checked against a dense float64 reference built here, by
reverse-over-reverse differentiation (torch.autograd.functional) of functions written independently of
curvscope's engines."""
from __future__ import annotations

import math
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call

from curvscope.analysis import batchnorm_gap, batchnorm_warning, determinism_warning
from curvscope.cli.main import main
from curvscope.curvature.kfac import kfac
from curvscope.curvature.newton_step import collinear_description, collinear_groups, newton_step
from curvscope.curvature.objective import Objective, output_description, predictions
from curvscope.curvature.partition import make_partition, owner, tensor_kind, tied_description
from curvscope.curvature.registry import curvature_operator
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import part_mask
from curvscope.sources.checkpoint import load_checkpoint
from curvscope.sources.datasets import Dataset
from curvscope.sources.losses import LOSSES, class_dim, cross_entropy, nll

torch.set_default_dtype(torch.float32)
CURVATURES = ("hessian", "ggn", "fisher")
Batches = list[tuple[torch.Tensor, torch.Tensor]]


# --- dense references ------------------------------------------------------------------------------------


def dense_curvatures(model: nn.Module, batches: Batches, forward: Callable[[dict, torch.Tensor], torch.Tensor],
                     loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """g, H, G and F over `batches` (weights n_b/N) for z = forward(params, x) and the batch-mean `loss`, by
    torch.autograd.functional, with the tensors of ``named_parameters()`` (tied ones once) as a flat vector."""
    named = list(model.named_parameters())
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named]).double()
    slices, start = [], 0
    for s in shapes:
        slices.append(slice(start, start + s.numel()))
        start += s.numel()

    def params(flat: torch.Tensor) -> dict:
        return {n: flat[sl].reshape(sh) for (n, _), sl, sh in zip(named, slices, shapes)}

    N = sum(len(x) for x, _ in batches)
    P = flat0.numel()
    H, G, Fi, g = (torch.zeros(P, P, dtype=torch.float64), torch.zeros(P, P, dtype=torch.float64),
                   torch.zeros(P, P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64))
    for x, y in batches:
        w = len(x) / N

        def batch_loss(flat: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return loss(forward(params(flat), x), y)

        H += w * torch.autograd.functional.hessian(batch_loss, flat0)
        g += w * torch.autograd.functional.jacobian(batch_loss, flat0)
        z0 = forward(params(flat0), x).detach()
        J = torch.autograd.functional.jacobian(lambda f, x=x: forward(params(f), x).reshape(-1), flat0)
        Lam = torch.autograd.functional.hessian(lambda z, y=y: loss(z.reshape(z0.shape), y), z0.reshape(-1))
        G += w * J.T @ Lam @ J
        per = torch.autograd.functional.jacobian(  # ∇ℓ_n: sample n's loss within its batch's forward pass
            lambda f, x=x, y=y: torch.stack([loss(z[None], t[None]) for z, t in zip(forward(params(f), x), y)]),
            flat0)
        Fi += w * per.T @ per / len(x)
    return {"gradient": g, "hessian": H, "ggn": G, "fisher": Fi, "slices": slices}


def projected(ref: dict[str, Any], curvature: str) -> np.ndarray:
    """C̄ = UᵀCU on the canonical partition, U_s = g on tensor s."""
    U = torch.stack([torch.zeros_like(ref["gradient"]).index_copy(0, torch.arange(sl.start, sl.stop),
                                                                    ref["gradient"][sl]) for sl in ref["slices"]])
    return (U @ ref[curvature] @ U.T).numpy()


def project(model: nn.Module, loss_fn: Any, batches: Batches, curvature: str, *, output_key: Any = None,
            batchnorm: str = "eval") -> Any:
    """curvscope's C̄ (canonical partition) with the objective configured."""
    with curvature_operator(model, loss_fn, batches, curvature) as op:
        op.obj.configure(output_key, batchnorm)
        return op.projection(make_partition(model))


def token_mean_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits, mean over the targets that are not -100, written out by hand."""
    keep = y != -100
    logp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return -(logp * keep).sum() / keep.sum().clamp(min=1)


# --- models ------------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


class FakeModelOutput(OrderedDict):
    """A stand-in for Hugging Face's ModelOutput: a dict with attribute access, indexed like its to_tuple()."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


Pair = namedtuple("Pair", ["hidden", "logits"])


class Wrapped(nn.Module):
    """An MLP whose predictions come back inside a container."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = mlp(), kind

    def forward(self, x: torch.Tensor) -> Any:
        z = self.net(x)
        h = x.sum(1, keepdim=True)  # something else, made without the network's modules
        if self.kind == "dict":
            return {"hidden": h, "logits": z}
        if self.kind == "modeloutput":
            return FakeModelOutput(loss=None, logits=z, hidden_states=(h,))
        if self.kind == "namedtuple":
            return Pair(h, z)
        if self.kind == "tuple":  # the predictions second: only --output-key 1 finds them
            return (h, z)
        return {"features": h, "scores": z}  # no 'logits': --output-key scores


WRAPS = {"dict": None, "modeloutput": None, "namedtuple": None, "tuple": "1", "named": "scores"}


class TinyGPT(nn.Module):
    """Token and position embeddings, one causal self-attention block with a -inf mask buffer, LayerNorm and an
    output layer tied to the token embedding; returns {"logits": (B, T, V)}."""

    mask: torch.Tensor

    def __init__(self, vocab: int = 5, dim: int = 3, length: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.wte = nn.Embedding(vocab, dim)
        self.pos_embedding = nn.Parameter(0.3 * torch.randn(length, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("mask", torch.full((length, length), float("-inf")).triu(1))
        self.dim = dim

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        T = idx.shape[1]
        h = self.wte(idx) + self.pos_embedding[:T]
        q, k, v = self.qkv(h).split(self.dim, -1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.dim) + self.mask[:T, :T]).softmax(-1)
        h = h + self.proj(att @ v)
        return {"logits": self.lm_head(self.ln(h))}


def tiny_gpt() -> nn.Module:
    """The model factory the command-line test names as a plug-in."""
    return TinyGPT()


def tokens(split: str = "train") -> Dataset:
    """Six sequences of 4 tokens; targets with ignored (-100) positions, one sample ignored entirely."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 5, (6, 4), generator=g)
    y = torch.randint(0, 5, (6, 4), generator=g)
    y[0, :2] = -100
    y[1, 3] = -100
    y[4] = -100
    return Dataset(x, y)


def statistics(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm's running mean, running variance and num_batches_tracked."""
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    return bn.running_mean, bn.running_var, bn.num_batches_tracked


class BNNet(nn.Module):
    """Linear → BatchNorm1d → tanh → Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0, 0.2)
            mean, var, count = statistics(self.bn)
            mean.normal_(0, 0.3)
            var.uniform_(0.5, 2.0)
            count.fill_(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def bn_net() -> nn.Module:
    return BNNet()


def stale_bn_net() -> nn.Module:
    """BNNet whose running statistics are far from the data's (as if never updated)."""
    net = BNNet()
    with torch.no_grad():
        net.fc2.weight.mul_(20)
        mean, var, _ = statistics(net.bn)
        mean.fill_(3.0)
        var.fill_(1e-4)
    return net


def bn_forward(stats: str) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """BNNet written out by hand: BatchNorm with the running statistics or with the batch's own (biased var)."""
    net = BNNet().double()

    def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
        h = x @ p["fc1.weight"].T + p["fc1.bias"]
        if stats == "batch":
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = net.bn.running_mean, net.bn.running_var
        h = (h - mean) / torch.sqrt(var + net.bn.eps) * p["bn.weight"] + p["bn.bias"]
        return torch.tanh(h) @ p["fc2.weight"].T + p["fc2.bias"]
    return forward


class Twins(nn.Module):
    """Two copies of one layer (equal weights, separate tensors) summed: their gradients are equal, C̄ singular."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(3, 4, bias=False)
        self.b = nn.Linear(3, 4, bias=False)
        self.c = nn.Linear(4, 3)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.a(x) + self.b(x)))


def twins() -> nn.Module:
    return Twins()


def classes(split: str = "train", n: int = 16, d: int = 3, seed: int = 5) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


MODULE = __name__.rsplit(".", 1)[-1]


# --- 1. model outputs ----------------------------------------------------------------------------------------


def test_the_output_rule() -> None:
    z, h = torch.ones(2, 3), torch.zeros(2, 4)
    assert predictions(z) is z
    assert predictions({"hidden": h, "logits": z}) is z  # 'logits' wins over order
    assert predictions({"hidden": h, "scores": z}) is h  # else the first tensor
    assert predictions({"hidden": h, "scores": z}, "scores") is z
    assert predictions({"aux": "text", "scores": z}) is z  # the first *tensor*
    assert predictions((h, z)) is h and predictions((h, z), "1") is z and predictions((h, z), -1) is z
    assert predictions(Pair(h, z)) is z and predictions(Pair(h, z), "hidden") is h
    out = FakeModelOutput(loss=None, logits=z, hidden_states=(h,))
    assert predictions(out) is z and out.logits is z
    assert predictions(out, 0) is z  # indexed like to_tuple(): entries that are None do not count
    assert output_description(out) == "'logits' of a FakeModelOutput (tensor (2, 3))"
    assert output_description((h, z), "1") == "item 1 of a tuple (tensor (2, 3))" and output_description(z) == ""

    class Obj:
        logits = z
    assert predictions(Obj()) is z
    for bad, key, message in ((z, "logits", "returns one tensor"), ({"a": z}, "b", "no entry 'b'"),
                              ((h, z), "5", "no item '5'"), ({"a": "text"}, None, "holds no tensor"),
                              (out, "hidden_states", "is tuple, not a tensor"), ("text", None, "cannot find"),
                              ((), None, "holds no tensor")):
        with pytest.raises(CurvscopeError, match=message):
            predictions(bad, key)
    with pytest.raises(CurvscopeError, match="BatchNorm mode"):
        Objective.create(mlp(), cross_entropy, [(torch.ones(2, 4), torch.zeros(2))], batchnorm="train")


@pytest.mark.parametrize("kind", sorted(WRAPS))
def test_every_engine_takes_the_same_predictions(kind: str) -> None:
    """H̄, Ḡ, F̄, K-FAC's factors, the loss after a step and the determinism check of a model returning a
    container are those of the same network returning its predictions."""
    torch.manual_seed(6)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    wrapped, key = Wrapped(kind), WRAPS[kind]
    plain = wrapped.net
    for curvature in CURVATURES:
        ours = project(wrapped, cross_entropy, batches, curvature, output_key=key)
        ref = project(plain, cross_entropy, batches, curvature)
        np.testing.assert_allclose(ours.pseudo_hessian, ref.pseudo_hessian, rtol=1e-12, atol=1e-15)
    with curvature_operator(wrapped, cross_entropy, batches, "ggn") as op, \
            curvature_operator(plain, cross_entropy, batches, "ggn") as ref_op:
        op.obj.configure(key)
        for a, b in zip(kfac(op).layers, kfac(ref_op).layers):
            torch.testing.assert_close(a.A + a.B, b.A + b.B, rtol=1e-12, atol=1e-15)
    etas = [np.full(4, 0.1)]
    np.testing.assert_allclose(
        loss_after_steps(wrapped, cross_entropy, batches, "canonical", etas, output_key=key)[1],
        loss_after_steps(plain, cross_entropy, batches, "canonical", etas)[1], rtol=1e-12)
    assert determinism_warning(wrapped, cross_entropy, batches[0], output_key=key) is None
    if key is not None:  # without the key, the rule takes another entry: refused or another function
        with pytest.raises(CurvscopeError):
            with curvature_operator(wrapped, cross_entropy, batches, "ggn") as op:
                op.obj.configure("nope")
                op.projection(make_partition(wrapped))


# --- 2. sequence logits ----------------------------------------------------------------------------------------


def test_sequence_layouts_and_ignored_targets() -> None:
    torch.manual_seed(7)
    z = torch.randn(3, 4, 5, dtype=torch.float64)  # (B, T, V)
    y = torch.randint(0, 5, (3, 4))
    y[0, 1] = y[2] = -100
    assert class_dim(z, y) == 2 and class_dim(z.transpose(1, 2), y) == 1
    torch.testing.assert_close(cross_entropy(z, y), F.cross_entropy(z.transpose(1, 2), y))
    torch.testing.assert_close(cross_entropy(z, y), token_mean_ce(z, y))
    torch.testing.assert_close(cross_entropy(z.transpose(1, 2), y), F.cross_entropy(z.transpose(1, 2), y))
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(nll(logp, y), F.nll_loss(logp.transpose(1, 2), y))
    square = torch.randn(2, 4, 4, dtype=torch.float64)  # T = V: both layouts fit; torch's is taken
    t = torch.randint(0, 4, (2, 4))
    assert class_dim(square, t) == 1
    torch.testing.assert_close(cross_entropy(square, t), F.cross_entropy(square, t))
    flat, labels = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, -100, 1, 1, 0])
    torch.testing.assert_close(cross_entropy(flat, labels), F.cross_entropy(flat, labels))
    soft = torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    torch.testing.assert_close(cross_entropy(flat, soft), F.cross_entropy(flat, soft))
    none = torch.full((1, 4), -100)  # nothing counts: 0 (torch: NaN), no gradient
    zz = z[:1].clone().requires_grad_(True)
    value = cross_entropy(zz, none)
    (grad,) = torch.autograd.grad(value, zz)
    assert float(value.detach()) == 0.0 and not grad.any()
    assert LOSSES["cross_entropy"] is cross_entropy and LOSSES["nll"] is nll


def test_gpt_like_model_against_dense_references() -> None:
    """(B, T, V) logits in a dict, a -inf causal mask, tied output weights and ignored targets: H̄, Ḡ and F̄ are
    the dense references'. The Fisher's ℓ_n is sample n's mean over its own counted tokens (0 for a sample with
    none), so (1/n_b) Σ ℓ_n differs from L_b, the batch's mean over its counted tokens, which the Hessian and the
    GGN differentiate exactly."""
    model = TinyGPT().double()
    data = tokens()
    batches = [(data.inputs[:3], data.targets[:3]), (data.inputs[3:], data.targets[3:])]
    ref = dense_curvatures(model, batches, lambda p, x: functional_call(model, p, (x,))["logits"], token_mean_ce)
    for curvature in CURVATURES:
        ours = project(model, cross_entropy, batches, curvature)
        expected = projected(ref, curvature)
        np.testing.assert_allclose(ours.pseudo_hessian, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())
    assert list(make_partition(model).names) == ["pos_embedding", "wte.weight", "qkv.weight", "qkv.bias",
                                                 "proj.weight", "proj.bias", "ln.weight", "ln.bias"]
    assert tied_description(model) == "lm_head.weight = wte.weight"
    x, y = batches[0]
    z = model(x)["logits"].detach()
    per_sample = torch.stack([token_mean_ce(z[n:n + 1], y[n:n + 1]) for n in range(3)])
    assert abs(float(per_sample.mean() - token_mean_ce(z, y))) > 1e-3  # the two means differ here


def test_sequence_nll_on_log_probabilities_keeps_the_softmax_curvature() -> None:
    """NLL of (B, T, V) log-probabilities: the GGN takes the cross-entropy's output Hessian (the same loss),
    as it does for (B, C) log-probabilities."""
    class LogProbs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = TinyGPT()

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.gpt(idx)["logits"], -1)

    model = LogProbs().double()
    data = tokens()
    batches = [(data.inputs, data.targets)]
    ours = project(model, nll, batches, "ggn").pseudo_hessian
    np.testing.assert_allclose(ours, project(model, cross_entropy, batches, "ggn").pseudo_hessian, rtol=1e-10)
    assert np.abs(ours).max() > 0


# --- 3. non-finite buffers -------------------------------------------------------------------------------------------


def test_a_minus_infinity_mask_is_allowed_but_bad_weights_and_statistics_are_not(tmp_path: Path) -> None:
    torch.save(TinyGPT().state_dict(), tmp_path / "gpt.pt")
    ck = load_checkpoint(tmp_path / "gpt.pt", model=f"{MODULE}:tiny_gpt")
    assert torch.isinf(ck.model.get_buffer("mask")).any()
    for name in ("bn.running_var", "fc1.weight"):
        state = BNNet().state_dict()
        state[name].view(-1)[0] = float("nan")
        torch.save(state, tmp_path / "bn.pt")
        with pytest.raises(CurvscopeError, match=f"NaN or infinite values in {name}"):
            load_checkpoint(tmp_path / "bn.pt", model=f"{MODULE}:bn_net")


# --- 4 and 5. tied tensors, parameter kinds ------------------------------------------------------------------


def test_parameter_kinds_and_layers() -> None:
    class Vit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.patch = nn.Linear(4, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.emb = nn.Module()
            self.emb.position_embedding = nn.Parameter(torch.zeros(3, 4))
            self.emb.register_token = nn.Parameter(torch.zeros(1, 4))
            self.head = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))

    part = make_partition(Vit())
    kinds = dict(zip(part.names, part.kinds))
    layers = dict(zip(part.names, part.layers))
    assert kinds == {"cls_token": "other", "pos_embed": "other", "patch.weight": "weight", "patch.bias": "bias",
                     "attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias", "attn.out_proj.weight": "weight",
                     "attn.out_proj.bias": "bias", "emb.position_embedding": "other", "emb.register_token": "other",
                     "head.bias": "bias", "head.parametrizations.weight.original0": "weight",
                     "head.parametrizations.weight.original1": "weight"}
    assert layers["cls_token"] == "cls_token" and layers["pos_embed"] == "pos_embed"
    assert layers["attn.in_proj_weight"] == "attn" and layers["emb.register_token"] == "emb"
    assert layers["head.parametrizations.weight.original0"] == "head"
    assert (tensor_kind("fc.weight_g"), tensor_kind("fc.weight_v"), tensor_kind("fc.weight_orig"),
            tensor_kind("attn.bias_k")) == ("weight", "weight", "weight", "other")
    assert owner("weight") == "" and owner("scale") == ""  # a root module's own tensors, as before
    ww = part_mask(np.asarray(part.kinds), "weight-weight")
    i = list(part.names).index("attn.in_proj_weight")
    assert ww[i, i] and not ww[list(part.names).index("cls_token")].any()
    by_layer = make_partition(Vit(), "layer")
    assert "attn" in by_layer.names and "cls_token" in by_layer.names and "emb" in by_layer.names
    assert tied_description(Vit()) == ""


# --- 6. BatchNorm ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "batch"])
def test_batchnorm_modes_against_dense_references(mode: str) -> None:
    """H̄, Ḡ and F̄ with BatchNorm's running statistics (eval) or each batch's own (batch), against BatchNorm
    written out by hand; the running statistics, num_batches_tracked and the modules' modes are untouched."""
    model = BNNet().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(8)
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref = dense_curvatures(model, batches, bn_forward(mode), F.cross_entropy)
    v = torch.randn(ref["gradient"].numel(), dtype=torch.float64)
    for curvature in CURVATURES:
        ours = project(model, cross_entropy, batches, curvature, batchnorm=mode)
        expected = projected(ref, curvature)
        np.testing.assert_allclose(ours.pseudo_hessian, expected, rtol=1e-9, atol=1e-13 * np.abs(expected).max())
        for memory in (1, 2 ** 30):  # products on graphs rebuilt each time (forward mode for G, F) or kept
            with curvature_operator(model, cross_entropy, batches, curvature, max_memory=memory) as op:
                op.obj.configure(None, mode)
                torch.testing.assert_close(op.operator().matvec(v), ref[curvature] @ v, rtol=1e-9, atol=1e-12)
    with curvature_operator(model, cross_entropy, batches, "fisher") as op:
        op.obj.configure(None, mode)
        factors = kfac(op)
        assert [lay.layer for lay in factors.layers] == ["fc1", "fc2"]
    loss_after_steps(model, cross_entropy, batches, "canonical", [np.full(6, 0.1)], batchnorm=mode)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not model.training and not model.bn.training and model.bn.track_running_stats


def test_batchnorm_warning() -> None:
    torch.manual_seed(9)
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    assert batchnorm_warning(BNNet(), cross_entropy, batches) == ""
    stale = stale_bn_net()
    message = batchnorm_warning(stale, cross_entropy, batches)
    assert "ratio" in message and "difference" in message and "--batchnorm batch analyses the other" in message
    assert "(--batchnorm batch)" in batchnorm_warning(stale, cross_entropy, batches, batchnorm="batch")
    assert batchnorm_warning(mlp(), cross_entropy, batches) == ""  # no BatchNorm
    assert batchnorm_gap(716.0, 3.0) == ["ratio 239 > 2", "difference 713 > 1"]  # the trial of issue #16
    assert batchnorm_gap(1.5, 0.6) == ["ratio 2.5 > 2"] and batchnorm_gap(12.0, 10.5) == ["difference 1.5 > 1"]
    assert batchnorm_gap(1.2, 1.1) == [] and batchnorm_gap(float("nan"), 1.0) == ["one of them is not finite"]


# --- 7. collinear groups -----------------------------------------------------------------------------------------


def test_collinear_groups_of_matrices() -> None:
    rng = np.random.default_rng(0)
    cols = rng.standard_normal((6, 3))
    A = np.column_stack([cols[:, 0], 1e6 * cols[:, 0], cols[:, 1], cols[:, 2]])  # 0 and 1 collinear, scales apart
    C, g = A.T @ A, np.ones(4)
    assert collinear_groups(C, g) == [[0, 1]]
    assert collinear_groups(A[:, 1:].T @ A[:, 1:], np.ones(3)) == []  # nonsingular
    Z = np.zeros((5, 5))
    Z[:4, :4] = C
    assert collinear_groups(Z, np.ones(5)) == [[0, 1], [4]]  # group 4: no curvature along its gradient
    assert collinear_groups(Z, np.r_[np.ones(4), 0.0]) == [[0, 1]]  # unless its gradient is zero: excluded
    assert collinear_description(["a", "b", "c", "d", "e"], [[0, 1], [4]]) == \
        "a ~ b; e (no curvature along its gradient)"
    B = np.column_stack([cols[:, 0], cols[:, 0], cols[:, 0], cols[:, 1]])  # three copies: one set
    assert collinear_groups(B.T @ B, np.ones(4)) == [[0, 1, 2]]
    assert collinear_groups(np.full((2, 2), np.nan), np.ones(2)) == []


@pytest.mark.parametrize("curvature", CURVATURES)
def test_duplicated_layers_are_named(curvature: str) -> None:
    model = twins().double()
    torch.manual_seed(10)
    batches = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    pseudo = project(model, cross_entropy, batches, curvature)
    step = newton_step(pseudo.pseudo_hessian, pseudo.pseudo_gradient)
    assert step.method == "pseudo-inverse" and step.rank == 3
    sets = collinear_groups(pseudo.pseudo_hessian, pseudo.pseudo_gradient)
    assert collinear_description(list(pseudo.names), sets) == "a.weight ~ b.weight"


# --- end to end: attributes, summary, info ---------------------------------------------------------------------------


def test_analyse_gpt_like_model_end_to_end(tmp_path: Path) -> None:
    torch.save(TinyGPT().state_dict(), tmp_path / "gpt.pt")
    out = tmp_path / "r.h5"
    res = run("analyse", tmp_path / "gpt.pt", "--model", f"{MODULE}:tiny_gpt", "--data", f"{MODULE}:tokens",
              "--loss", "cross_entropy", "--curvature", "ggn", "-o", out, "--no-render", "--no-spectrum",
              "--batch-size", "3")
    assert res.exit_code == 0, res.output
    assert "tied (one tensor under several names, analysed once): lm_head.weight = wte.weight" in res.output
    assert "predictions: 'logits' of a dict (tensor (3, 4, 5))" in res.output
    with h5py.File(out) as fh:
        attrs = fh["checkpoints/gpt@ggn"].attrs
        assert attrs["tied"] == "lm_head.weight = wte.weight" and attrs["batchnorm"] == ""
    info = run("info", out).output
    assert "tied (one tensor under several names, analysed once): lm_head.weight = wte.weight" in info
    assert "predictions: 'logits' of a dict" in info


def test_analyse_batchnorm_and_collinear_end_to_end(tmp_path: Path) -> None:
    torch.save(stale_bn_net().state_dict(), tmp_path / "bn.pt")
    out = tmp_path / "r.h5"
    common = ("--data", f"{MODULE}:classes", "--loss", "cross_entropy", "-o", out, "--no-render",
              "--no-spectrum", "--kfac", "off", "--batch-size", "8")
    res = run("analyse", tmp_path / "bn.pt", "--model", f"{MODULE}:stale_bn_net", *common)
    assert res.exit_code == 0, res.output
    assert "curvscope: warning: bn: the loss with BatchNorm's running statistics" in res.stderr
    res = run("analyse", tmp_path / "bn.pt", "--model", f"{MODULE}:stale_bn_net", "--batchnorm", "batch",
              "--curvature", "fisher", *common)
    assert res.exit_code == 0, res.output
    assert "the Fisher's per-sample losses are each sample's loss within its batch" in res.stdout
    torch.save(twins().state_dict(), tmp_path / "twins.pt")
    res = run("analyse", tmp_path / "twins.pt", "--model", f"{MODULE}:twins", *common)
    assert res.exit_code == 0, res.output
    assert "H̄ is singular; collinear groups: a.weight ~ b.weight" in res.stdout
    info = run("info", out).output
    assert "BatchNorm statistics: each batch's own (batch)" in info and "warning: the loss with BatchNorm" in info
    assert "collinear groups: a.weight ~ b.weight" in info
    with h5py.File(out) as fh:
        assert fh["checkpoints/bn"].attrs["batchnorm"] == "eval"
        assert fh["checkpoints/bn@fisher"].attrs["batchnorm"] == "batch"
        assert fh["checkpoints/twins"].attrs["collinear"] == "a.weight ~ b.weight"
