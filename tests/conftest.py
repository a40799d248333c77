"""Shared fixtures: small float64 models and the dense reverse-over-reverse Hessian they are checked against."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]


def interruptible() -> None:
    """A child process's SIGINT back to the default, so that Python raises KeyboardInterrupt on it even when
    this test run was started with SIGINT ignored (as a shell's background job is): for subprocess's
    preexec_fn in the tests that interrupt a run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
SHIPPED = ROOT / "checkpoints" / "lenet5_digits_ep21.pt"


class SmallCNN(nn.Module):
    """Conv → tanh → maxpool → Linear: every layer type of LeNet-5, in a few hundred parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


class NormNet(nn.Module):
    """Linear → LayerNorm → GELU → Linear: where forward-over-reverse differentiation goes wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


class PoolNet(nn.Module):
    """Conv → in-place ReLU → max pooling (overlapping windows, padding, ceil mode) → Linear, as modules:
    piecewise-linear layers (zero second derivative almost everywhere) and an in-place activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.pool(self.act(self.conv(x))).flatten(1)), dim=1)


class TwoHeads(nn.Module):
    """Two independent linear heads concatenated: linear in its parameters (G = H under MSE; K-FAC is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class AttentionNet(nn.Module):
    """Self-attention (nn.MultiheadAttention, need_weights=False: a fused kernel) → mean over tokens → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(y.mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@dataclass
class Case:
    """A float64 model, its loss and an analysis set of N samples."""

    model: nn.Module
    loss_fn: object
    inputs: torch.Tensor
    targets: torch.Tensor

    def batches(self, sizes: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The analysis set cut into batches of the given sizes (one batch when None)."""
        sizes = sizes or [len(self.targets)]
        assert sum(sizes) == len(self.targets)
        out, start = [], 0
        for n in sizes:
            out.append((self.inputs[start:start + n], self.targets[start:start + n]))
            start += n
        return out


def make_case(name: str, n: int = 12, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    if name == "mlp":
        return Case(mlp().double(), F.cross_entropy, torch.randn(n, 4, dtype=torch.float64),
                    torch.randint(0, 3, (n,)))
    if name == "cnn":
        return Case(SmallCNN().double(), F.nll_loss, torch.randn(n, 2, 8, 8, dtype=torch.float64),
                    torch.randint(0, 4, (n,)))
    if name == "pool":
        return Case(PoolNet().double(), F.nll_loss, torch.randn(n, 2, 8, 8, dtype=torch.float64),
                    torch.randint(0, 4, (n,)))
    if name == "attention":
        return Case(AttentionNet().double(), F.cross_entropy, torch.randn(n, 3, 4, dtype=torch.float64),
                    torch.randint(0, 3, (n,)))
    if name == "layernorm":
        return Case(NormNet().double(), F.cross_entropy, torch.randn(n, 5, dtype=torch.float64),
                    torch.randint(0, 3, (n,)))
    raise KeyError(name)


@dataclass
class Dense:
    """The exact float64 Hessian H (P x P) and gradient g (P,) of L over the whole analysis set."""

    hessian: torch.Tensor
    gradient: torch.Tensor
    slices: list[slice]  # where each parameter tensor sits in the flat vector


def dense(case: Case, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Dense:
    """H and g by reverse-over-reverse differentiation (torch.autograd.functional.hessian)."""
    names = [n for n, _ in case.model.named_parameters()]
    shapes = [p.shape for _, p in case.model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    slices, start = [], 0
    for s in shapes:
        slices.append(slice(start, start + s.numel()))
        start += s.numel()
    batches = batches or case.batches()
    n = sum(len(y) for _, y in batches)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = {nm: flat[sl].reshape(sh) for nm, sl, sh in zip(names, slices, shapes)}
        return sum(len(y) / n * case.loss_fn(functional_call(case.model, params, (x,)), y) for x, y in batches)

    with sdpa_kernel(SDPBackend.MATH):  # the reference attention kernel, with every derivative
        h = torch.autograd.functional.hessian(loss, flat0)
    flat = flat0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(flat), flat)
    return Dense(h, g, slices)


@pytest.fixture(params=["mlp", "cnn", "pool", "layernorm", "attention"])
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(request.param)


TINY_MODEL = {"in_features": 12, "hidden": [6], "out_features": 3}
TINY_DATA = {"name": "synthetic", "kwargs": {"shape": [12], "num_classes": 3, "n": 40, "seed": 1}}


def write_tiny_bundle(path: Path, epoch: int = 3, scale: float = 1.0) -> Path:
    """A curvscope bundle of a 2-layer MLP on 40 synthetic samples (weights multiplied by `scale`)."""
    from curvscope import save_checkpoint
    from curvscope.sources.zoo import build_model

    torch.manual_seed(epoch)
    model = build_model("mlp", TINY_MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p)).mul_(scale)
    save_checkpoint(path, model, model_name="mlp", model_kwargs=TINY_MODEL, data=TINY_DATA, loss="nll", epoch=epoch)
    return path


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return write_tiny_bundle(tmp_path / "tiny_ep03.pt")
