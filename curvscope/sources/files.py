"""Real data sets read from local files (no downloads): CIFAR-10, MNIST and npz arrays.

- `cifar10`: the "python version" batch files (data_batch_1..5, test_batch) in
  `root`, normalised with the paper's mean (0.4914, 0.4822, 0.4465) and std
  (0.2470, 0.2435, 0.2616). The batches are pickles; they are read with an
  unpickler that only admits numpy arrays, so no code from them can run.
- `mnist`: the idx files (train-images-idx3-ubyte, ... optionally .gz) in
  `root`, scaled to [0, 1] and normalised with mean 0.1307, std 0.3081.
- `npz`: arrays `x` and `y` in the file `root` (or `x_train`/`y_train` and
  `x_test`/`y_test` for the two splits), read without pickle.
"""
from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from curvscope.errors import CurvscopeError, summary

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _root(root: str | None, what: str) -> Path:
    if not root:
        raise CurvscopeError(f"the {what} data set is read from local files: give their location with --data-root.")
    path = Path(root)
    if not path.exists():
        raise CurvscopeError(f"--data-root {root!r} does not exist.")
    return path


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays, lists, bytes and numbers; refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def cifar10(split: str = "train", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images (N, 3, 32, 32), normalised, and labels, from the python-version batch files."""
    folder = _root(root, "cifar10")
    xs, ys = [], []
    for name in CIFAR_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise CurvscopeError(f"CIFAR-10 batch file {str(path)!r} is missing: --data-root must be the "
                                 f"folder holding data_batch_1..5 and test_batch (cifar-10-batches-py).")
        try:
            batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
            data, labels = batch[b"data"], batch[b"labels"]
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file fails in many ways
            raise CurvscopeError(f"{str(path)!r} is not a CIFAR-10 batch file: {type(exc).__name__}: {exc}.") from None
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.concatenate(ys))


def _idx(path: Path) -> np.ndarray:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                raw = gzip.decompress(raw)
            break
    else:
        raise CurvscopeError(f"MNIST file {str(path)!r} (or .gz) is missing from --data-root.")
    if len(raw) < 8 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise CurvscopeError(f"{str(path)!r} is not an idx file of unsigned bytes.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise CurvscopeError(f"{str(path)!r} is truncated: it should hold {int(np.prod(dims))} values.")
    return data.reshape(dims)


def mnist(split: str = "train", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images (N, 1, 28, 28), normalised, and labels, from the idx files."""
    folder = _root(root, "mnist")
    images, labels = (_idx(folder / name) for name in MNIST_FILES[split])
    if len(images) != len(labels):
        raise CurvscopeError(f"MNIST {split} images and labels disagree in number ({len(images)} vs {len(labels)}).")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MNIST_MEAN) / MNIST_STD, torch.from_numpy(labels.astype(np.int64))


def npz(split: str = "train", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays x, y (or x_<split>, y_<split>) from an .npz file, without pickle."""
    path = _root(root, "npz")
    try:
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as arrays:  # closed even when np.load fails
            keys = (f"x_{split}", f"y_{split}") if f"x_{split}" in arrays else ("x", "y")
            if not set(keys) <= set(arrays.files):
                raise CurvscopeError(f"{str(path)!r} holds {', '.join(arrays.files)}; it needs arrays x and y "
                                     f"(or x_{split} and y_{split}).")
            x, y = arrays[keys[0]], arrays[keys[1]]
    except CurvscopeError:
        raise
    except ValueError as exc:  # numpy refuses object arrays without pickle; its advice to allow pickle is not ours
        if "pickle" in str(exc):
            raise CurvscopeError(f"{str(path)!r} holds Python objects (object arrays), which curvscope does not "
                                 f"unpickle: save x and y as plain numeric arrays.") from None
        raise CurvscopeError(f"{str(path)!r} is not a readable npz file: {summary(exc)}.") from None
    except Exception as exc:  # noqa: BLE001 - a damaged zip fails in many ways (OSError, BadZipFile, EOFError)
        raise CurvscopeError(f"{str(path)!r} is not a readable npz file: {summary(exc)}.") from None
    if len(x) != len(y):
        raise CurvscopeError(f"{str(path)!r}: x holds {len(x)} samples but y holds {len(y)}.")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    return (xt.float() if xt.is_floating_point() or xt.dtype == torch.uint8 else xt), \
        (yt.long() if not yt.is_floating_point() else yt.float())
