"""Convolutions of the data: the lean double-backward graph gives the same products, without the input gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from curvscope.curvature.data_conv import data_convolutions

CONVS = [
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), (5, 4, 11)),
    (nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=2, groups=2), (5, 4, 9, 8)),
    (nn.Conv2d(3, 5, 2, bias=False), (5, 3, 6, 6)),
    (nn.Conv3d(2, 3, 2, padding=1), (5, 2, 4, 4, 3)),
]


def _net(conv: nn.Module) -> nn.Module:
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()


def _products(net: nn.Module, x: torch.Tensor, y: torch.Tensor, vs: list[torch.Tensor],
              lean: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = list(net.parameters())
    if lean:
        with data_convolutions(net):
            loss = nn.functional.cross_entropy(net(x), y)
    else:
        loss = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return [g.detach() for g in grads], list(torch.autograd.grad(grads, params, vs))


@pytest.mark.parametrize("conv,shape", CONVS)
def test_same_gradient_and_hessian_products(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = _net(conv)
    x, y = torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    net(x)  # materialise the lazy layer
    vs = [torch.randn_like(p) for p in net.parameters()]
    g_lean, hv_lean = _products(net, x, y, vs, lean=True)
    g_plain, hv_plain = _products(net, x, y, vs, lean=False)
    for a, b in zip(g_lean + hv_lean, g_plain + hv_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class _Transposed(TorchDispatchMode):
    """Counts transposed convolutions (the discarded input gradient of a convolution's double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.convolution.default and args[6]:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_input_gradient_is_formed_for_data() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    vs = [torch.randn_like(p) for p in net.parameters()]
    params = list(net.parameters())
    with data_convolutions(net):
        grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    with _Transposed() as seen:
        torch.autograd.grad(grads, params, vs)
    assert seen.count == 0


def test_other_convolutions_and_inputs_keep_their_own_forward() -> None:
    same = nn.Conv2d(2, 2, 3, padding="same")
    reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")

    class Custom(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    custom, plain, own = Custom(2, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)
    own.forward = lambda x: x  # the user's own instance forward stays, and stays after the block
    net = nn.Sequential(same, reflect, custom, plain, own)
    with data_convolutions(net):
        assert "forward" in vars(plain)
        assert all("forward" not in vars(m) for m in (same, reflect, custom))
        assert own(torch.ones(1)) == 1
        x = torch.randn(1, 2, 9, 9, requires_grad=True)  # an input that wants its gradient gets it
        (gx,) = torch.autograd.grad(plain(x).sum(), x)
        assert gx.abs().sum() > 0
    assert all("forward" not in vars(m) for m in net if m is not own) and "forward" in vars(own)
