"""Convolutions of the data, differentiated twice without the input gradient PyTorch throws away.

PyTorch's convolution double backward (``_convolution_double_backward``)
forms the gradient with respect to the convolution's input whenever the
weight's second-order gradient is defined, even when that input is data that
needs no gradient; the result is discarded. In a network whose first layer
convolves the images, that is a full-size transposed convolution in every
Hessian-vector product (about a fifth of LeNet-5's product on a CPU).

Inside :func:`data_convolutions`, every ``nn.Conv1d/2d/3d`` whose input needs
no gradient runs through :class:`_DataConv`: the same convolution, whose
backward gives the same weight and bias gradients, but written so that
differentiating them again only forms ∂(g_W · v_W)/∂g_out = conv(x, v_W).
Values are unchanged; only the recorded graph differs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _no_output_padding(x: torch.Tensor) -> list[int]:
    return [0] * (x.dim() - 2)


class _WeightGradient(torch.autograd.Function):
    """g_W = ∂L/∂W of y = conv(x, W) as a function of g_out (linear; x is data, W only fixes the shape)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Any, padding: Any,
                dilation: Any, groups: int) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(g_out, x, weight, None, stride, padding, dilation, False,
                                                   _no_output_padding(x), groups, [False, True, False])[1]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, x, _, *ctx.conv = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, v_weight: torch.Tensor) -> tuple:
        x, = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        g_out = torch.ops.aten.convolution(x, v_weight, None, stride, padding, dilation, False,
                                           _no_output_padding(x), groups)
        return g_out, None, None, None, None, None, None


class _DataConv(torch.autograd.Function):
    """y = conv(x, W) + b for data x: gradients for W and b only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any,
                dilation: Any, groups: int) -> torch.Tensor:
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                          _no_output_padding(x), groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, _, *ctx.conv = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        g_weight = _WeightGradient.apply(g_out, x, weight.detach(), *ctx.conv) if ctx.needs_input_grad[1] else None
        g_bias = g_out.sum([0, *range(2, g_out.dim())]) if ctx.needs_input_grad[2] else None
        return None, g_weight, g_bias, None, None, None, None


def _eligible(module: nn.Module) -> bool:
    """Plain convolutions with zero padding given as numbers, whose forward nobody replaced (a subclass
    or an instance attribute may compute something else)."""
    return (type(module) in _CONVS and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and "forward" not in vars(module))


def _forward(module: _ConvNd, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad or not torch.is_grad_enabled():
        return type(module).forward(module, x)
    return _DataConv.apply(x, module.weight, module.bias, list(module.stride), list(module.padding),
                           list(module.dilation), module.groups)


@contextmanager
def data_convolutions(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s convolutions of data record the lean double-backward graph."""
    patched = [m for m in model.modules() if _eligible(m)]
    for m in patched:
        m.forward = _forward.__get__(m)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in patched:
            del m.forward
