"""Real data sets from local files, on small files the tests write: CIFAR-10, MNIST, npz, plug-ins."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from curvscope.errors import CurvscopeError
from curvscope.sources.datasets import build_dataset
from curvscope.sources.files import CIFAR_MEAN, CIFAR_STD


def write_cifar(root: Path, n: int = 4, seed: int = 0) -> np.ndarray:
    """CIFAR-10 python-version batch files of n images each; returns the first batch's raw data."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        first = data if first is None else first
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(), b"data": data,
                 b"filenames": [b"x.png"] * n}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return first


def test_cifar10_reads_batches_and_normalises(tmp_path: Path) -> None:
    raw = write_cifar(tmp_path / "cifar-10-batches-py")
    train = build_dataset("cifar10", "train", {"root": str(tmp_path / "cifar-10-batches-py")})
    test = build_dataset("cifar10", "test", {"root": str(tmp_path / "cifar-10-batches-py")})
    assert train.inputs.shape == (20, 3, 32, 32) and len(test) == 4
    expected = (raw[0].reshape(3, 32, 32)[1, 0, 0] / 255.0 - CIFAR_MEAN[1]) / CIFAR_STD[1]
    assert float(train.inputs[0, 1, 0, 0]) == pytest.approx(expected, rel=1e-6)


def test_cifar10_refuses_code_in_its_pickles(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_cifar(root)
    import os
    (root / "data_batch_3").write_bytes(pickle.dumps({"x": os.system}, protocol=2))
    with pytest.raises(CurvscopeError, match="not a CIFAR-10 batch file.*not allowed"):
        build_dataset("cifar10", "train", {"root": str(root)})
    (root / "data_batch_3").unlink()
    with pytest.raises(CurvscopeError, match="data_batch_3.*missing"):
        build_dataset("cifar10", "train", {"root": str(root)})
    with pytest.raises(CurvscopeError, match="--data-root"):
        build_dataset("cifar10", "train", {})


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = _idx(arr)
        (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    ds = build_dataset("mnist", "train", {"root": str(tmp_path)})
    assert ds.inputs.shape == (6, 1, 28, 28) and ds.targets.tolist() == labels.tolist()
    assert float(ds.inputs[0, 0, 0, 0]) == pytest.approx((images[0, 0, 0] / 255 - 0.1307) / 0.3081, rel=1e-5)
    (tmp_path / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))).write_bytes(
        gzip.compress(_idx(labels)[:-2]) if gz else _idx(labels)[:-2])
    with pytest.raises(CurvscopeError, match="truncated"):
        build_dataset("mnist", "train", {"root": str(tmp_path)})


def test_npz_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 3), dtype=np.float32), y=np.arange(5))
    ds = build_dataset("npz", "train", {"root": str(path)})
    assert ds.inputs.shape == (5, 3) and ds.targets.dtype == torch.int64
    np.savez(path, a=np.ones(3))
    with pytest.raises(CurvscopeError, match="needs arrays x and y"):
        build_dataset("npz", "train", {"root": str(path)})
    np.savez(path, x=np.ones((5, 3)), y=np.arange(4))
    with pytest.raises(CurvscopeError, match="x holds 5 samples but y holds 4"):
        build_dataset("npz", "train", {"root": str(path)})


def test_data_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_data.py").write_text(
        "import torch\n"
        "def batches(split, n=6):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2])) for _ in range(n // 3)]\n"
        "def loader(split):\n"
        "    ds = torch.utils.data.TensorDataset(torch.randn(5, 2), torch.arange(5))\n"
        "    return torch.utils.data.DataLoader(ds, batch_size=2)\n"
        "def bad(split):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(build_dataset("my_data:batches", "train", {"n": 9})) == 9
    assert build_dataset("my_data:loader", "test").inputs.shape == (5, 2)
    with pytest.raises(CurvscopeError, match="not a Dataset, a DataLoader"):
        build_dataset("my_data:bad", "train")
