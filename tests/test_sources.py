"""The model zoo, the data sets and the analysis batches."""
from __future__ import annotations

import pytest
import torch

from curvscope.errors import CurvscopeError
from curvscope.sources.datasets import analysis_batches, build_dataset
from curvscope.sources.losses import build_loss
from curvscope.sources.zoo import build_model


def test_lenet5_is_the_papers() -> None:
    net = build_model("lenet5")
    assert [n for n, _ in net.named_parameters()] == [f"{m}.{k}" for m in ("conv1", "conv2", "fc1", "fc2", "fc3")
                                                      for k in ("weight", "bias")]
    assert sum(p.numel() for p in net.parameters()) == 62006
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2))  # log-softmax outputs
    assert all(float(p.detach().abs().max()) == 0 for n, p in net.named_parameters() if n.endswith("bias"))


def test_vgg11_prime_is_the_papers() -> None:
    net = build_model("vgg11")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 512
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.ELU) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("vgg11", {"batch_norm": True}).modules())


def test_initialisation_variance() -> None:
    torch.manual_seed(0)
    w = build_model("vgg11").features[0].weight  # fan_in 27, σ_w² = 2
    assert float(w.detach().var()) == pytest.approx(2 / 27, rel=0.1)


def test_digits_is_real_standardised_and_split() -> None:
    train, test = build_dataset("digits", "train"), build_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.inputs.shape[1:] == (1, 32, 32) and train.targets.dtype == torch.int64
    assert float(train.inputs.mean()) == pytest.approx(0, abs=1e-5)
    assert float(train.inputs.std()) == pytest.approx(1, abs=1e-4)
    assert set(train.targets.tolist()) == set(range(10))
    torch.testing.assert_close(build_dataset("digits", "train").inputs, train.inputs)  # fixed split


def test_analysis_batches_take_the_first_n() -> None:
    data = build_dataset("synthetic", "train", {"shape": [3], "n": 10})
    batches = analysis_batches(data, 7, 3)
    assert [len(y) for _, y in batches] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), data.inputs[:7])
    with pytest.raises(CurvscopeError, match="larger than"):
        analysis_batches(data, 11, 3)
    with pytest.raises(CurvscopeError, match="empty"):
        analysis_batches(data, 0, 3)
    with pytest.raises(CurvscopeError, match="positive"):
        analysis_batches(data, 5, 0)


def test_unknown_names() -> None:
    with pytest.raises(CurvscopeError, match="zoo has gpt2, lenet5, mlp, resnet18, vgg11, vit"):
        build_model("resnet")
    with pytest.raises(CurvscopeError, match="unknown loss"):
        build_loss("hinge")
    with pytest.raises(CurvscopeError, match="unknown split"):
        build_dataset("digits", "valid")


def test_seeded_random_subset() -> None:
    data = build_dataset("synthetic", "train", {"shape": [2], "n": 50})
    a = analysis_batches(data, 10, 4, seed=3)
    b = analysis_batches(data, 10, 4, seed=3)
    c = analysis_batches(data, 10, 4, seed=4)
    torch.testing.assert_close(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b]))
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c]))
    assert not torch.equal(torch.cat([x for x, _ in a]), data.inputs[:10])
