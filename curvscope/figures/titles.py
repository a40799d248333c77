"""Figure titles that say what was analysed, from a stored checkpoint's attributes; tick labels that stay readable.

With many groups (S = 30 … 300 parameter tensors) tick labels are thinned to every k-th one, keeping
layer boundaries where they fit, and the name prefix every label shares is shown once instead of on each.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from curvscope.curvature.kinds import CurvatureKind, stored_kind
from curvscope.store.hdf5 import StoredCheckpoint


@dataclass(frozen=True)
class MatrixNames:
    """How figures name a checkpoint's curvature C, its projection C̄ = UᵀCU and C̄'s inverse.

    The stored datasets keep their Hessian names (``pseudo_hessian`` holds C̄ whatever C is);
    the words and symbols here follow the record's ``curvature`` attribute.
    """

    kind: CurvatureKind
    pseudo_inverse: bool  # C̄⁺ (Moore-Penrose) was stored in place of C̄⁻¹

    @property
    def symbol(self) -> str:
        """C's letter: H, G or F."""
        return self.kind.symbol

    @property
    def bar(self) -> str:
        """C̄ in plain text: H̄, Ḡ or F̄."""
        return self.kind.bar

    def tex(self, inverse: bool = False, normalized: bool = False) -> str:
        r"""C̄, or the stored inverse (C̄⁻¹, or C̄⁺ for the pseudo-inverse), as mathtext, in N(·) when `normalized`.

        ``$\bar{H}$``, ``$\bar{G}^{-1}$``, ``$N(\bar{F}^{+})$``.
        """
        math = rf"\bar{{{self.symbol}}}"
        if inverse:
            math += "^{+}" if self.pseudo_inverse else "^{-1}"
        return f"$N({math})$" if normalized else f"${math}$"

    @property
    def short(self) -> str:
        """C's name in a compound: Hessian, GGN, Fisher."""
        return self.kind.short

    @property
    def pseudo(self) -> str:
        """C̄'s name: pseudo-Hessian, pseudo-GGN, pseudo-Fisher."""
        return f"pseudo-{self.short}"

    @property
    def matrix(self) -> str:
        """C in prose, with its letter: "the Hessian H", "the generalised Gauss-Newton matrix G"."""
        return f"the {self.kind.title} {self.symbol}"

    @property
    def spectrum(self) -> str:
        """Title of C's spectrum: "Hessian spectrum", "GGN spectrum"."""
        return f"{self.short} spectrum"


def matrix_names(stored: StoredCheckpoint) -> MatrixNames:
    """The names of `stored`'s curvature (the Hessian in files written before curvatures were recorded).

    A curvature this version does not know (a newer file) is named generically, C̄, by its stored name.
    """
    try:
        kind = stored_kind(stored.attrs)
    except ValueError:
        name = str(stored.attrs.get("curvature"))
        kind = CurvatureKind(name, "C", f"curvature {name!r}", name)
    method = stored.data_attrs.get("pseudo_hessian_inverse", {}).get("method")
    return MatrixNames(kind, method == "pseudo-inverse")


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


MAX_LABELS = 60  # tick labels per axis, however large the panel
LABEL_SPACING = 1.35  # a tick label needs this many times its font size (in points) along the axis


def common_prefix(names: Sequence[str], sep: str = ".") -> str:
    """The longest prefix ending in `sep` that every name has and none equals ("transformer.h." for
    "transformer.h.0.attn.weight", "transformer.h.1.mlp.bias", …); "" for fewer than two names or none shared."""
    names = [str(n) for n in names]
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    prefix = prefix[:prefix.rfind(sep) + 1]
    while prefix and any(len(n) <= len(prefix) for n in names):
        prefix = prefix[:prefix[:-1].rfind(sep) + 1]
    return prefix


def strip_prefix(names: Sequence[str], prefix: str) -> list[str]:
    """`names` without `prefix` (those that do not start with it unchanged)."""
    return [n[len(prefix):] if prefix and n.startswith(prefix) else n for n in (str(m) for m in names)]


def prefix_note(prefix: str) -> str:
    """What a title says of a stripped prefix: "" when none was stripped."""
    return f"tick labels omit the common prefix '{prefix}'" if prefix else ""


def labels_that_fit(inches: float, fontsize: float, most: int = MAX_LABELS) -> int:
    """How many tick labels of `fontsize` points fit side by side along `inches` of axis (2 to `most`)."""
    return max(2, min(most, int(inches * 72 / (LABEL_SPACING * fontsize))))


def thinned(n: int, cap: int, anchors: Sequence[int] = ()) -> list[int]:
    """At most `cap` of the positions 0 … n-1 to label, at least ⌈n/cap⌉ apart: all of them when n ≤ cap.

    The first and the last always; then the `anchors` (layer boundaries) in order, each where it keeps that
    distance from those taken; then every k-th position (k = ⌈n/cap⌉) in the gaps left.
    """
    if n <= max(cap, 1):
        return list(range(n))
    step = -(-n // max(cap, 2))  # ceil: positions at least `step` apart number at most cap
    taken: list[int] = []

    def far(i: int) -> bool:
        return all(abs(i - t) >= step for t in taken)

    for i in (0, n - 1, *sorted(a for a in anchors if 0 <= a < n), *range(0, n, step)):
        if far(i):
            taken.append(i)
    return sorted(taken)
