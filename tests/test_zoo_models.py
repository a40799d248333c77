"""The modern zoo models (resnet18, vit, gpt2): built by name at tiny width, their shapes, parameter tensors and
kinds, and H̄ against a dense reverse-over-reverse Hessian."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope import load_checkpoint, pseudo_hessian, save_checkpoint
from curvscope.curvature.partition import make_partition
from curvscope.errors import CurvscopeError
from curvscope.sources.losses import build_loss
from curvscope.sources.zoo import build_model

TINY = {
    "resnet18": {"width": 1, "in_channels": 1, "num_classes": 3},
    "vit": {"image_size": 8, "patch_size": 4, "in_channels": 1, "num_classes": 3, "width": 4, "depth": 2,
            "heads": 2, "mlp_ratio": 2},
    "gpt2": {"vocab_size": 11, "context": 6, "width": 4, "depth": 2, "heads": 2, "mlp_ratio": 2},
}


def lm_cross_entropy(outputs: dict[str, torch.Tensor] | torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of (B, T, V) logits (in a dict or not)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny float64 model `name` in eval mode; BatchNorm with non-trivial running statistics."""
    torch.manual_seed(seed)
    model = build_model(name, TINY[name]).double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():  # weights away from their initial 1 and 0
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model


def data(name: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if name == "gpt2":
        tokens = torch.randint(0, TINY["gpt2"]["vocab_size"], (n, TINY["gpt2"]["context"] + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    side = 4 if name == "resnet18" else 8
    return torch.randn(n, 1, side, side, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def dense_pseudo_hessian(model: torch.nn.Module, loss_fn, batches: list, vectorised: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
    """UᵀHU and ḡ from the dense Hessian H of L = Σ_b (n_b/N) L_b by reverse-over-reverse differentiation, under
    the math attention kernel: row by row (``torch.autograd.functional.hessian``, as conftest's `dense`), or, when
    `vectorised`, by torch.func's ``jacrev(jacrev(·))``, vmapped over H's rows and ten times faster. On torch
    2.13 the vectorised Hessian is wrong through a LayerNorm whose input and affine parameters both vary (14 %
    relative error on one such LayerNorm, 2e-5 on the tiny ViT): it is used only for the ResNet."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [s.numel() for s in shapes]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    n_all = sum(len(y) for _, y in batches)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, sizes), shapes))))
        return sum(len(y) / n_all * loss_fn(functional_call(model, params, (x,)), y) for x, y in batches)

    with sdpa_kernel(SDPBackend.MATH):
        h = jacrev(jacrev(loss))(flat0) if vectorised else torch.autograd.functional.hessian(loss, flat0)
        g = jacrev(loss)(flat0)
    cols = torch.zeros(len(g), len(sizes), dtype=g.dtype)
    for s, (lo, hi) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))):
        cols[lo:hi, s] = g[lo:hi]
    return (cols.T @ h @ cols).numpy(), (cols.T @ g).numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- shapes and parameters

@pytest.mark.parametrize("width", [1, 2, 64])
def test_resnet18_has_62_tensors_at_any_width(width: int) -> None:
    with torch.device("meta"):
        model = build_model("resnet18", {"width": width})
    part = make_partition(model)
    assert part.size == 62
    assert sum(k == "weight" for k in part.kinds) == 41 and sum(k == "bias" for k in part.kinds) == 21
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(model.get_submodule(c).bias is None for c in convs)  # 17 + 3 shortcuts
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    if width == 64:
        assert sum(p.numel() for p in model.parameters()) == 11_173_962  # CIFAR ResNet-18's usual count
    assert part.layers[-2:] == ("fc", "fc") and part.layers[0] == "conv1"


def test_resnet18_forward() -> None:
    model = tiny("resnet18")
    x, _ = data("resnet18", 5)
    assert model(x).shape == (5, 3)
    big = build_model("resnet18", {"width": 2}).eval()
    assert big(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_vit_tensors_and_forward(depth: int) -> None:
    kwargs = {**TINY["vit"], "depth": depth}
    model = build_model("vit", kwargs).eval()
    part = make_partition(model)
    assert part.size == 8 + 12 * depth
    assert part.names[:4] == ("embed.cls_token", "embed.pos_embed", "embed.proj.weight", "embed.proj.bias")
    assert part.kinds[:2] == ("other", "other") and part.layers[:2] == ("embed", "embed")
    assert "blocks.0.attn.in_proj_weight" in part.names and "blocks.0.attn.out_proj.weight" in part.names
    assert tuple(model.embed.pos_embed.shape) == (1, 5, 4)  # (8 / 4)² patches + the class token
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 3)
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()) == depth


def test_vit_defaults() -> None:
    model = build_model("vit").eval()
    assert make_partition(model).size == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [1, 2])
def test_gpt2_tensors_tied_head_and_causal_mask(depth: int) -> None:
    kwargs = {**TINY["gpt2"], "depth": depth}
    torch.manual_seed(0)
    model = build_model("gpt2", kwargs).eval()
    part = make_partition(model)
    assert part.size == 4 + 12 * depth
    assert part.names[:2] == ("wte.weight", "wpe.weight") and part.names[-2:] == ("ln_f.weight", "ln_f.bias")
    assert model.lm_head.weight is model.wte.weight and "lm_head.weight" not in part.names
    assert "lm_head.weight" in model.state_dict()  # tied, as Hugging Face's GPT-2 saves it
    mask = model.blocks[0].attn.mask
    assert torch.isneginf(mask.triu(1)[torch.ones(6, 6).triu(1).bool()]).all()
    assert (mask.tril() == 0).all() and "blocks.0.attn.mask" in model.state_dict()
    tokens = torch.randint(0, 11, (2, 6))
    out = model(tokens)
    assert isinstance(out, dict) and set(out) == {"logits"} and out["logits"].shape == (2, 6, 11)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 11  # the future does not change the past
    assert torch.equal(model(changed)["logits"][:, :4], out["logits"][:, :4])
    assert model(tokens[:, :3])["logits"].shape == (2, 3, 11)


def test_gpt2_defaults_and_gpt2_small_size() -> None:
    model = build_model("gpt2").eval()
    assert make_partition(model).size == 28 and sum(p.numel() for p in model.parameters()) == 470_528
    assert model(torch.randint(0, 512, (2, 64)))["logits"].shape == (2, 64, 512)
    with torch.device("meta"):
        small = build_model("gpt2", {"vocab_size": 50257, "context": 1024, "width": 768, "depth": 12, "heads": 12})
    assert sum(p.numel() for p in small.parameters()) == 124_439_808  # Hugging Face's gpt2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(CurvscopeError, match="divisible"):
        build_model("vit", {"image_size": 10, "patch_size": 4})
    with pytest.raises(CurvscopeError, match="divisible"):
        build_model("gpt2", {"width": 10, "heads": 4})
    with pytest.raises(CurvscopeError, match="width"):
        build_model("resnet18", {"width": 0})


# --------------------------------------------------------------------------- H̄ against the dense Hessian

@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_pseudo_hessian_matches_dense(name: str) -> None:
    """H̄ = UᵀHU and ḡ to 1e-10 over two unequal batches, for both strategies (BatchNorm in eval mode with
    non-trivial statistics)."""
    model = tiny(name)
    x, y = data(name, 5)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    ref_h, ref_g = dense_pseudo_hessian(model, F.cross_entropy, batches, vectorised=name == "resnet18")
    res = pseudo_hessian(model, F.cross_entropy, batches)
    assert rel(res.pseudo_hessian, ref_h) <= 1e-10
    assert rel(pseudo_hessian(model, F.cross_entropy, batches, strategy="batched").pseudo_hessian, ref_h) <= 1e-10
    assert rel(res.pseudo_gradient, ref_g) <= 1e-12
    assert list(res.names) == [n for n, _ in model.named_parameters()]
    assert not model.training  # left as found


def test_gpt2_pseudo_hessian_matches_dense_with_a_sequence_loss() -> None:
    """The LM through a loss that takes the dict and flattens the (B, T, V) logits: H̄ over the tied embedding,
    the -inf mask and LayerNorm, against the dense Hessian."""
    model = tiny("gpt2")
    x, y = data("gpt2", 5)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    ref_h, ref_g = dense_pseudo_hessian(model, lm_cross_entropy, batches)
    res = pseudo_hessian(model, lm_cross_entropy, batches)
    assert rel(res.pseudo_hessian, ref_h) <= 1e-10
    assert rel(pseudo_hessian(model, lm_cross_entropy, batches, strategy="batched").pseudo_hessian, ref_h) <= 1e-10
    assert rel(res.pseudo_gradient, ref_g) <= 1e-12
    assert np.isfinite(res.pseudo_hessian).all() and res.pseudo_hessian.shape == (28, 28)


def test_gpt2_with_the_builtin_cross_entropy() -> None:
    """The built-in `cross_entropy` on the dict of (B, T, V) logits with (B, T) targets: the same H̄ as the
    flattened loss (through whatever picks the logits out of the dict)."""
    model = tiny("gpt2")
    x, y = data("gpt2", 5)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    ours = pseudo_hessian(model, build_loss("cross_entropy"), batches).pseudo_hessian
    np.testing.assert_allclose(ours, pseudo_hessian(model, lm_cross_entropy, batches).pseudo_hessian, rtol=1e-12)


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_bundles_round_trip(tmp_path: Path, name: str) -> None:
    """A bundle of the model (BatchNorm statistics included) loads back to the same H̄."""
    model = tiny(name).float()  # saved in float32, as trained models are
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, model, model_name=name, model_kwargs=TINY[name], loss="cross_entropy", epoch=0,
                    data={"name": "synthetic", "kwargs": {}})
    ck = load_checkpoint(path)
    x, y = data(name, 4)
    a = pseudo_hessian(model.double(), F.cross_entropy, [(x, y)]).pseudo_hessian
    b = pseudo_hessian(ck.model.double(), ck.loss_fn, [(x, y)]).pseudo_hessian
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


def test_gpt2_bundle_with_its_mask_buffer(tmp_path: Path) -> None:
    """A GPT-2 bundle (its -inf causal mask is in the state_dict) loads, and its recorded built-in loss gives the
    flattened loss's H̄."""
    model = tiny("gpt2").float()
    path = tmp_path / "gpt2.pt"
    save_checkpoint(path, model, model_name="gpt2", model_kwargs=TINY["gpt2"], loss="cross_entropy", epoch=0,
                    data={"name": "synthetic", "kwargs": {}})
    ck = load_checkpoint(path)
    x, y = data("gpt2", 4)
    a = pseudo_hessian(model.double(), lm_cross_entropy, [(x, y)]).pseudo_hessian
    b = pseudo_hessian(ck.model.double(), ck.loss_fn, [(x, y)]).pseudo_hessian
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


def test_resnet18_imagenet_stem() -> None:
    """stem="imagenet": torchvision's 7x7 stride-2 stem and max pooling (4x fewer positions per side), S still 62."""
    from curvscope.errors import CurvscopeError
    from curvscope.sources.zoo import build_model

    model = build_model("resnet18", {"width": 2, "stem": "imagenet"})
    assert sum(1 for p in model.parameters() if p.requires_grad) == 62
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(CurvscopeError, match="stem"):
        build_model("resnet18", {"stem": "tiny"})
