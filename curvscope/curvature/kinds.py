"""The curvatures curvscope computes, by name: what commands that only read results need, without torch.

Each kind's operator (the computation) is registered in ``curvscope.curvature.registry``.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CurvatureKind:
    """A curvature matrix C of the loss: its name in files and on the command line, and how it is written."""

    name: str  # registry key and the results file's `curvature` attribute
    symbol: str  # its letter: C̄ = UᵀCU is written with a bar over it (H̄, Ḡ, F̄)
    title: str  # its name in prose
    short: str  # its name in compounds such as "GGN-vector products"

    @property
    def bar(self) -> str:
        """The projection's symbol, e.g. H̄."""
        return unicodedata.normalize("NFC", self.symbol + "\u0304")  # Ḡ precomposed; H̄ and F̄ have no such form


KINDS: dict[str, CurvatureKind] = {k.name: k for k in (
    CurvatureKind("hessian", "H", "Hessian", "Hessian"),
    CurvatureKind("ggn", "G", "generalised Gauss-Newton matrix", "GGN"),
    CurvatureKind("fisher", "F", "empirical Fisher", "Fisher"),
)}
DEFAULT_CURVATURE = "hessian"


def curvature_kind(name: str) -> CurvatureKind:
    """The kind called `name`; files written before curvatures were recorded hold the Hessian."""
    try:
        return KINDS[name or DEFAULT_CURVATURE]
    except KeyError:
        raise ValueError(f"unknown curvature {name!r}: choose one of {', '.join(KINDS)}") from None


def stored_kind(attrs: Mapping[str, object]) -> CurvatureKind:
    """The curvature of a stored record, from its attributes (the Hessian when they do not say)."""
    return curvature_kind(str(attrs.get("curvature") or ""))


def record_label(label: str, curvature: str) -> str:
    """A checkpoint's label in a results file for one curvature: the label itself for the Hessian (as in files
    written before curvatures were recorded), ``label@curvature`` for the others."""
    return label if curvature == DEFAULT_CURVATURE else f"{label}@{curvature}"

#: K-FAC's flavours (``curvscope.curvature.kfac``): type-2 approximates the GGN, empirical the empirical Fisher,
#: mc (sampled labels) either; and the rules by which a layer's block is approximated ("exact": not at all).
KFAC_FLAVOURS = ("type-2", "empirical", "mc")
KFAC_FLAVOUR_OF = {"ggn": "type-2", "fisher": "empirical"}
KFAC_RULES = ("linear", "conv2d", "exact")
KFAC_APPROXIMATIONS = ("expand", "reduce")  # how weight-shared positions (sequence, pixels) enter the factors
