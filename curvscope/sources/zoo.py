"""The model zoo: the paper's LeNet-5 and VGG-11', and a small MLP, by name.

Architectures follow docs/DESIGN.md §2 (from the author's code). Weights are drawn
from N(0, sigma_w^2 / fan_in), biases are zero; the networks end in a
log-softmax so that the paper's NLL loss applies (cross-entropy on log-softmax
outputs gives the same value).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from curvscope.errors import CurvscopeError, summary
from curvscope.sources.plugins import call_plugin

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise CurvscopeError(
            f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}."
        ) from None


def init_paper(model: nn.Module, sigma_w: float) -> nn.Module:
    """Weights ~ N(0, sigma_w^2 / fan_in), biases 0, for every Conv2d and Linear."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.normal_(0.0, sigma_w / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.zero_()
    return model


class LeNet5(nn.Module):
    """Conv(c,6,5)-act-pool-Conv(6,16,5)-act-pool-FC 400-120-84-10, log-softmax output."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, activation: str = "tanh",
                 input_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.act1 = _activation(activation)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.act2 = _activation(activation)
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.act3 = _activation(activation)
        self.fc2 = nn.Linear(120, 84)
        self.act4 = _activation(activation)
        self.fc3 = nn.Linear(84, num_classes)
        init_paper(self, sigma_w=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.act4(self.fc2(self.act3(self.fc1(x))))
        return torch.log_softmax(self.fc3(x), dim=1)


class VGG11(nn.Module):
    """VGG "A" with 3x3 convs (padding 1), no BatchNorm by default, global average pool, Linear(512, classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, activation: str = "elu",
                 batch_norm: bool = False, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG11_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, int(round(int(item) * width)))
            layers.append(nn.Conv2d(channels, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(_activation(activation))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_paper(self, sigma_w=math.sqrt(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return torch.log_softmax(self.classifier(x), dim=1)


class MLP(nn.Module):
    """Fully connected net in_features-hidden...-out_features; log-softmax output unless regression."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] | list[int] = (32, 16),
                 out_features: int = 10, activation: str = "tanh", log_softmax: bool = True) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_activation(activation))
        self.net = nn.Sequential(*layers)
        self.log_softmax = log_softmax
        init_paper(self, sigma_w=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.log_softmax(y, dim=1) if self.log_softmax else y


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "vgg11": VGG11, "mlp": MLP}



def build_model(name: str, kwargs: dict | None = None) -> nn.Module:
    """Instantiate zoo model `name`, or call the factory "package.module:function", with `kwargs`."""
    if ":" in name:
        model = call_plugin(name, kwargs, "model")
        if not isinstance(model, nn.Module):
            raise CurvscopeError(f"the model factory {name!r} returned a {type(model).__name__}, not a "
                                 f"torch.nn.Module.")
        return model
    if name not in MODELS:
        raise CurvscopeError(
            f"unknown model {name!r}: the zoo has {', '.join(sorted(MODELS))}."
        )
    try:
        return MODELS[name](**(kwargs or {}))
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - arguments of the wrong type or value fail in many ways
        raise CurvscopeError(f"model {name!r} cannot be built with the arguments {kwargs!r} ({summary(exc)}): "
                             f"give valid ones with --model-kwargs.") from None
