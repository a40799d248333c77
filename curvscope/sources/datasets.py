"""Data sets by name, and the analysis set cut into batches.

`digits` is scikit-learn's bundled handwritten digits (1,797 real 8x8 images),
upsampled to 32x32 (bilinear), one channel, standardised with the train split's
mean and standard deviation, split 80/20 by a fixed seeded permutation.
`synthetic` is seeded Gaussian inputs of a given shape with uniform labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset

from curvscope.errors import CurvscopeError, summary
from curvscope.sources import files
from curvscope.sources.plugins import call_plugin

SPLITS = ("train", "test")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
MAX_ELEMENTS = 2 ** 31  # inputs of at most 8 GiB in float32: larger requests are refused, not attempted


def _check_size(elements: int, what: str) -> None:
    if elements > MAX_ELEMENTS:
        raise CurvscopeError(f"{what} would hold {elements:.3g} input values, more than the {MAX_ELEMENTS:.3g} "
                             f"curvscope makes in memory: ask for fewer samples or smaller inputs.")


@dataclass(frozen=True)
class Dataset:
    """Inputs and integer targets of one split, as tensors with a leading sample axis."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CurvscopeError(f"unknown split {split!r}: use 'train' or 'test'.")


def digits(split: str = "train", size: int = 32) -> Dataset:
    """scikit-learn's digits as (N, 1, size, size) standardised float32 images and int64 labels."""
    _check_split(split)
    from sklearn.datasets import load_digits

    _check_size(1797 * size * size, f"digits at size {size}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(DIGITS_TEST_FRACTION * len(labels)))
    train_idx, test_idx = torch.from_numpy(order[n_test:]), torch.from_numpy(order[:n_test])
    train = images[train_idx]
    mean, std = train.mean(), train.std()
    idx = train_idx if split == "train" else test_idx
    return Dataset((images[idx] - mean) / std, labels[idx])


def synthetic(split: str = "train", shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
              n: int = 1024, seed: int = 0) -> Dataset:
    """Seeded N(0, 1) inputs of `shape` with uniform labels in [0, num_classes)."""
    _check_split(split)
    _check_size(n * math.prod(shape), f"synthetic data of {n} samples of shape {tuple(shape)}")
    gen = torch.Generator().manual_seed(seed * 2 + SPLITS.index(split))
    x = torch.randn((n, *shape), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return Dataset(x, y)


def _from_files(reader: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., Dataset]:
    def load(split: str = "train", root: str | None = None) -> Dataset:
        _check_split(split)
        return Dataset(*reader(split, root))
    load.__doc__ = reader.__doc__
    return load


DATASETS: dict[str, Callable[..., Dataset]] = {"digits": digits, "synthetic": synthetic,
                                               "cifar10": _from_files(files.cifar10),
                                               "mnist": _from_files(files.mnist), "npz": _from_files(files.npz)}


def _stack(items: list, spec: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of (inputs, targets) pairs, stacked (`what` = "samples") or concatenated ("batches")."""
    join = torch.stack if what == "samples" else torch.cat
    try:
        pairs = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in items]
        return join([x for x, _ in pairs]), join([y for _, y in pairs])
    except Exception as exc:  # noqa: BLE001 - whatever the plug-in's items are
        raise CurvscopeError(f"the data plug-in {spec!r} gave {what} that are not (inputs, targets) pairs of "
                             f"tensors or arrays of one shape: {summary(exc)}.") from None


def _plugin_dataset(spec: str, split: str, kwargs: dict | None) -> Dataset:
    """A Dataset from "package.module:function" (called with split=... and `kwargs`).

    The function may return a curvscope Dataset, a map-style or iterable
    ``torch.utils.data.Dataset`` of (input, target) samples (a TensorDataset, say),
    a DataLoader, or any other iterable of (inputs, targets) batches.
    """
    obj = call_plugin(spec, {"split": split, **(kwargs or {})}, "data")
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, TorchDataset) and not isinstance(obj, IterableDataset):
        try:
            items = [obj[i] for i in range(len(obj))]  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the plug-in's __len__ or __getitem__
            raise CurvscopeError(f"the data plug-in {spec!r} returned a {type(obj).__name__} whose samples cannot "
                                 f"be read by index: {summary(exc)}.") from None
        what = "samples"
    else:
        try:
            items = list(cast(Iterable[Any], obj))  # a non-iterable fails here, as handled below
        except Exception as exc:  # noqa: BLE001 - not iterable, or its iterator fails
            raise CurvscopeError(f"the data plug-in {spec!r} returned a {type(obj).__name__}, not a Dataset, a "
                                 f"DataLoader or an iterable of (inputs, targets): {summary(exc)}.") from None
        what = "samples" if isinstance(obj, IterableDataset) else "batches"
    if not items:
        raise CurvscopeError(f"the data plug-in {spec!r} returned no {what}.")
    return Dataset(*_stack(items, spec, what))


def build_dataset(name: str, split: str = "train", kwargs: dict | None = None) -> Dataset:
    """Load data set `name` (a key of DATASETS, or "package.module:function") for `split`."""
    if ":" in name:
        return _plugin_dataset(name, split, kwargs)
    if name not in DATASETS:
        raise CurvscopeError(f"unknown data set {name!r}: choose one of {', '.join(sorted(DATASETS))}.")
    try:
        return DATASETS[name](split=split, **(kwargs or {}))
    except CurvscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - arguments of the wrong type or value fail in many ways
        raise CurvscopeError(f"data set {name!r} cannot be made with the arguments {kwargs!r} ({summary(exc)}): "
                             f"give valid ones with --data-kwargs.") from None


def analysis_batches(data: Dataset, samples: int | None, batch_size: int, seed: int | None = None,
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `samples` items of `data` (all when None) cut into batches of `batch_size`.

    With `seed`, the `samples` items are a deterministic random subset instead
    (a seeded permutation). The last batch may be smaller; the engines weight
    each batch by n_b / N.
    """
    n = len(data) if samples is None else samples
    if n <= 0 or len(data) == 0:
        raise CurvscopeError("the analysis set is empty: ask for at least one sample.")
    if n > len(data):
        raise CurvscopeError(f"--samples {n} is larger than the data set, which holds {len(data)} samples.")
    if batch_size <= 0:
        raise CurvscopeError(f"--batch-size must be positive, not {batch_size}.")
    if seed is not None:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        data = Dataset(data.inputs[idx], data.targets[idx])
    return [(data.inputs[i:min(i + batch_size, n)], data.targets[i:min(i + batch_size, n)])
            for i in range(0, n, batch_size)]

