"""Figure titles that say what was analysed, from a stored checkpoint's attributes."""
from __future__ import annotations

from typing import Sequence

from curvscope.store.hdf5 import StoredCheckpoint


def describe(stored: StoredCheckpoint) -> str:
    """"model on dataset (split, N=n), epoch e" (the epoch only when known)."""
    a = stored.attrs
    epoch = f", epoch {a['epoch']}" if int(a.get("epoch", -1)) >= 0 else ""
    return f"{a.get('model')} on {a.get('dataset')} ({a.get('split')}, N={a.get('n_samples')}){epoch}"


def figure_title(stored: StoredCheckpoint, what: str) -> str:
    """"label: what — model on dataset (split, N=n), epoch e"."""
    return f"{stored.label}: {what} — {describe(stored)}"


def trajectory_labels(checkpoints: Sequence[StoredCheckpoint]) -> list[str]:
    """"epoch e" for each checkpoint when every epoch is known and they differ; the stored labels otherwise."""
    epochs = [int(ck.attrs.get("epoch", -1)) for ck in checkpoints]
    if min(epochs) >= 0 and len(set(epochs)) == len(epochs):
        return [f"epoch {e}" for e in epochs]
    return [ck.label for ck in checkpoints]
