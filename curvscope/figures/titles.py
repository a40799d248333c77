"""Figure titles that say what was analysed, from a stored checkpoint's attributes."""
from __future__ import annotations

from curvscope.store.hdf5 import StoredCheckpoint


def describe(stored: StoredCheckpoint) -> str:
    """"model on dataset (split, N=n), epoch e" (the epoch only when known)."""
    a = stored.attrs
    epoch = f", epoch {a['epoch']}" if int(a.get("epoch", -1)) >= 0 else ""
    return f"{a.get('model')} on {a.get('dataset')} ({a.get('split')}, N={a.get('n_samples')}){epoch}"


def figure_title(stored: StoredCheckpoint, what: str) -> str:
    """"label: what — model on dataset (split, N=n), epoch e"."""
    return f"{stored.label}: {what} — {describe(stored)}"
