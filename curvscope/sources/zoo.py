"""The model zoo, by name: the paper's LeNet-5 and VGG-11', a small MLP, and three modern shapes.

The paper's models follow docs/DESIGN.md §2 (from the author's code). Weights are
drawn from N(0, sigma_w^2 / fan_in), biases are zero; the networks end in a
log-softmax so that the paper's NLL loss applies (cross-entropy on log-softmax
outputs gives the same value).

The modern shapes return logits (use the `cross_entropy` loss), are defined here
(neither torchvision nor transformers is needed) and take a `width` (the
transformers also a `depth`) so that tests can build them tiny:

- `resnet18`: a CIFAR-style ResNet-18 (3x3 stem, no max pooling, BasicBlocks
  [2, 2, 2, 2], BatchNorm; torchvision's 7x7 stem and max pooling with
  ``stem="imagenet"``): S = 62 parameter tensors at any width;
- `vit`: a small Vision Transformer (patch-embedding convolution, class token,
  learned position embeddings, pre-norm blocks of `nn.MultiheadAttention` and an
  MLP): S = 8 + 12 x depth (32 at depth 2);
- `gpt2`: a GPT-2-like language model (token and position embeddings, causal
  self-attention masked by a registered buffer holding -inf above the diagonal,
  LayerNorm, MLP, an LM head tied to the token embedding) returning
  ``{"logits": (B, T, vocab)}`` for (B, T) token ids: S = 4 + 12 x depth (28 at
  depth 2).
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


class BasicBlock(nn.Module):
    """ResNet's basic block: 3x3 conv-BN-ReLU-3x3 conv-BN, plus the input (through a 1x1 conv-BN when the shape
    changes), then ReLU."""

    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18: a CIFAR-style 3x3 stem conv-BN-ReLU (no max pooling; `stem="imagenet"`: torchvision's 7x7
    stride-2 conv-BN-ReLU and 3x3 stride-2 max pooling), four stages of two BasicBlocks with
    `width` x (1, 2, 4, 8) channels (strides 1, 2, 2, 2), global average pooling, Linear; returns logits.
    S = 62 tensors at any width (P = 11.2 M at width 64 with 10 classes); Kaiming-normal convolutions,
    BatchNorm at weight 1 and bias 0 (torchvision's initialisation)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, stem: str = "cifar") -> None:
        super().__init__()
        if width < 1:
            raise CurvscopeError(f"resnet18 needs a width of at least 1, not {width}.")
        if stem not in ("cifar", "imagenet"):
            raise CurvscopeError(f"resnet18's stem is 'cifar' or 'imagenet', not {stem!r}.")
        self.stem = stem
        self.conv1 = (nn.Conv2d(in_channels, width, 3, padding=1, bias=False) if stem == "cifar" else
                      nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(4):
            out = width * 2 ** stage
            for i in range(2):
                blocks.append(BasicBlock(channels, out, 2 if stage > 0 and i == 0 else 1))
                channels = out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = torch.nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layers(x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LayerNorm x), then x + MLP(LayerNorm x) (GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class PatchEmbedding(nn.Module):
    """Image to tokens: `patch_size` patches embedded by a strided convolution (`proj`), a class token
    prepended, learned position embeddings added."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise CurvscopeError(f"vit needs an image_size ({image_size}) divisible by patch_size ({patch_size}).")
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch_size) ** 2 + 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding with a class token and learned position embeddings
    (`PatchEmbedding`), `depth` pre-norm blocks, a final LayerNorm and a Linear head on the class
    token; returns logits. S = 8 + 12 x depth."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 width: int = 128, depth: int = 2, heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.embed = PatchEmbedding(image_size, patch_size, in_channels, width)
        self.blocks = nn.Sequential(*(ViTBlock(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x)))[:, 0])


class CausalSelfAttention(nn.Module):
    """GPT-2's attention: one Linear for queries, keys and values, softmax(q kᵀ/√d + mask) v over `heads`
    heads, then a Linear; the causal mask is a registered buffer, 0 on and below the diagonal, -inf above."""

    mask: torch.Tensor

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        if width % heads:
            raise CurvscopeError(f"gpt2 needs a width ({width}) divisible by heads ({heads}).")
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads) + self.mask[:T, :T]
        y = torch.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    """x + attention(LayerNorm x), then x + MLP(LayerNorm x) with GELU (tanh approximation), as in GPT-2."""

    def __init__(self, width: int, heads: int, context: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, mlp_ratio * width)
        self.c_proj = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """A GPT-2-like language model on (B, T) token ids, T <= `context`: token plus position embeddings,
    `depth` blocks, a final LayerNorm and a bias-free LM head whose weight is the token embedding's (tied:
    one trainable tensor). Returns ``{"logits": (B, T, vocab_size)}``. S = 4 + 12 x depth; GPT-2's
    initialisation (N(0, 0.02²), residual projections N(0, 0.02²/(2 depth)), biases 0)."""

    def __init__(self, vocab_size: int = 512, context: int = 64, width: int = 128, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads, context, mlp_ratio) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.ln_f(self.blocks(self.wte(tokens) + self.wpe(positions)))
        return {"logits": self.lm_head(x)}


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "vgg11": VGG11, "mlp": MLP,
                                               "resnet18": ResNet18, "vit": ViT, "gpt2": GPT2}


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
