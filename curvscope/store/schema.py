"""The results file, schema version 1, declared once (README, "HDF5 layout (schema version 1)").

The reader (:mod:`curvscope.store.reader`) checks every file against :data:`RESULTS`
before anything uses its data; the writer (:mod:`curvscope.store.hdf5`) produces it.
A shape is a tuple of dimensions: an ``int`` is an exact length, a ``str`` names a
dimension (``S`` groups, ``n`` steps, ``k`` eigenvalues …) that must agree wherever it
appears within the group that declares it in ``dims``, and ``None`` is any length.
Declared members must be present unless the group is ``optional``, and then complete;
declared attributes must be present unless ``required`` is off, and of their kind and
shape when present. Members a group does not declare are not read, nor are undeclared
attributes except scalar strings, numbers and flags (a newer writer's), which are passed on.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from curvscope.curvature.kinds import KFAC_APPROXIMATIONS, KFAC_FLAVOUR_OF, KFAC_FLAVOURS, KFAC_RULES, KINDS
from curvscope.measures.interactions import GROUPINGS, PARTS

FORMAT = "curvscope"
SCHEMA_VERSION = 1

FLOAT, INT, BOOL, STR = "float", "int", "bool", "str"
#: How a kind is named in messages.
KIND_NAMES = {FLOAT: "a float", INT: "an integer", BOOL: "a boolean", STR: "a string"}

Dim = int | str | None
#: A problem found by a rule, or None. Arguments: the group's datasets and attributes by relative path.
Rule = Callable[[Mapping[str, Any], Mapping[str, Mapping[str, Any]]], str | None]
#: The names of checkpoints and of spectrum blocks: printable characters other than "/", and not ".".
NAME_PATTERN = r"(?!\.\Z)[^\x00-\x1f\x7f/]+"


@dataclass(frozen=True)
class Attr:
    """An attribute: its kind, shape (``()``: a scalar) and, for strings, the values allowed."""

    kind: str
    shape: tuple[Dim, ...] = ()
    required: bool = True
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Data:
    """A dataset: the kind of its elements, its shape, its attributes and, for strings, the values allowed."""

    kind: str
    shape: tuple[Dim, ...]
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    """A group: its members and attributes, or (``each``) any number of members of one layout."""

    members: Mapping[str, Data | Group] = field(default_factory=dict)
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    optional: bool = False
    each: Group | None = None  # every member (named by NAME_PATTERN) is a group of this layout
    dims: Mapping[str, int] = field(default_factory=dict)  # dimensions bound here, with their least size
    rules: tuple[Rule, ...] = ()  # checks across members, run once the members have been read


def _steps_complete(data: Mapping[str, Any], attrs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The audit needs Newton's and Cauchy's step and one block-diagonal step per matrix and grouping."""
    have = set(zip(data["steps/kind"].tolist(), data["steps/grouping"].tolist()))
    need = {("newton", ""), ("cauchy", "")} | {(m, g) for m in ("hessian", "inverse") for g in GROUPINGS}
    missing = sorted(need - have)
    if missing:
        return "steps/kind and steps/grouping lack the step(s) " + ", ".join(f"{k} {g}".strip() for k, g in missing)
    return None


def _kfac_of_its_curvature(data: Mapping[str, Any], attrs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """interactions/kfac belongs to a GGN or Fisher record, with a flavour that approximates that curvature."""
    if "interactions/kfac" not in attrs:
        return None
    curvature = str(attrs.get("", {}).get("curvature", "hessian"))
    flavour = str(attrs["interactions/kfac"]["flavour"])
    if curvature not in KFAC_FLAVOUR_OF:
        return f"group interactions/kfac is in a {curvature} record; K-FAC approximates the GGN or the Fisher only"
    if flavour not in (KFAC_FLAVOUR_OF[curvature], "mc"):
        return f"interactions/kfac has flavour {flavour!r}, which does not approximate the record's {curvature}"
    return None


def _blocks_ordered(data: Mapping[str, Any], attrs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The attribute `order` names every block group, each once."""
    order = list(attrs[""]["order"])
    blocks = sorted(path for path in attrs if path and "/" not in path)
    if sorted(order) != blocks:
        return f"attribute order {order} does not name each of the block groups {blocks} once"
    return None


def _eigen(**extra: Attr) -> Group:
    """k extreme eigenvalues of H (or of a block) and how they were found."""
    return Group(members={"values": Data(FLOAT, ("k",)), "residuals": Data(FLOAT, ("k",)),
                          "converged": Data(BOOL, ("k",))},
                 attrs={"which": Attr(STR), "dim": Attr(INT), "tol": Attr(FLOAT), "steps": Attr(INT),
                        "verified": Attr(BOOL), "seed": Attr(INT), **extra},
                 dims={"k": 0})


TRACE = {"trace": Data(FLOAT, (), attrs={"method": Attr(STR), "matvecs": Attr(INT), "seed": Attr(INT)}),
         "trace_stderr": Data(FLOAT, ())}

MATRIX_INTERACTIONS = Group(members={
    "normalized": Data(FLOAT, ("S", "S")),
    "off_block_ratio": Data(FLOAT, (len(GROUPINGS), len(PARTS))),
    "distance_mean": Data(FLOAT, ("K",)),
    "distance_max": Data(FLOAT, ("K",)),
    "distance_count": Data(INT, ("K",)),
})

KFAC = Group(
    optional=True,  # for the GGN and the Fisher only, and absent in files of an older curvscope
    attrs={"flavour": Attr(STR, choices=KFAC_FLAVOURS), "approximation": Attr(STR, choices=KFAC_APPROXIMATIONS),
           "mc_samples": Attr(INT), "seed": Attr(INT), "elapsed_s": Attr(FLOAT), "exact": Attr(STR, (None,))},
    members={
        "pseudo_curvature": Data(FLOAT, ("S", "S")),
        "rule": Data(STR, ("S",), choices=KFAC_RULES),
        "deviation_ratio": Data(FLOAT, (len(PARTS),)),
        "learning_rates": Data(FLOAT, ("S",)),
        "predicted_decrease": Data(FLOAT, ()),
        "actual_decrease": Data(FLOAT, ()),
        "efficiency": Data(FLOAT, ()),
        "layers": Group(members={"name": Data(STR, ("L",)), "rule": Data(STR, ("L",)),
                                 "error": Data(FLOAT, ("L",)), "efficiency": Data(FLOAT, ("L",))},
                        dims={"L": 1}),
    },
)

INTERACTIONS = Group(
    optional=True,  # files of an older curvscope have none
    attrs={"positive_definite": Attr(BOOL), "efficiency": Attr(STR), "significance_threshold": Attr(FLOAT),
           "groupings": Attr(STR, (len(GROUPINGS),), choices=GROUPINGS),
           "parts": Attr(STR, (len(PARTS),), choices=PARTS)},
    members={
        "hessian": MATRIX_INTERACTIONS,
        "inverse": MATRIX_INTERACTIONS,
        "steps": Group(members={
            "name": Data(STR, ("n",)),
            "kind": Data(STR, ("n",), choices=("newton", "cauchy", "hessian", "inverse", "cubic")),
            "grouping": Data(STR, ("n",), choices=("", *GROUPINGS)),
            "learning_rates": Data(FLOAT, ("n", "S")),
            "predicted_decrease": Data(FLOAT, ("n",)),
            "actual_decrease": Data(FLOAT, ("n",)),
            "efficiency": Data(FLOAT, ("n",)),
        }),
        "significant": Data(BOOL, ("S", "S")),
        "significant_count": Data(INT, ()),
        "kfac": KFAC,
    },
    dims={"K": 0, "n": 1},
    rules=(_steps_complete,),
)

ORDER3 = Group(
    optional=True,  # Hessian records analysed with --order3 (issue #18); absent from older files
    attrs={"singular_threshold": Attr(FLOAT), "elapsed_s": Attr(FLOAT)},
    members={
        "diagonal": Data(FLOAT, ("S",)),
        "stderr": Data(FLOAT, ("S",)),
        "cubic": Group(members={
            "damping_int": Data(FLOAT, ("m",)),
            "requested": Data(BOOL, ("m",)),
            "learning_rates": Data(FLOAT, ("m", "S")),
            "r": Data(FLOAT, ("m",)),
            "r0": Data(FLOAT, ("m",)),
            "start": Data(STR, ("m",), choices=("positive definite", "analytical", "numerical")),
            "found": Data(BOOL, ("m",)),
            "reason": Data(STR, ("m",)),
            "residual": Data(FLOAT, ("m",)),
            "predicted_decrease": Data(FLOAT, ("m",)),
            "actual_decrease": Data(FLOAT, ("m",)),
        }, dims={"m": 1}),
    },
)

BLOCK = Group(attrs={"kind": Attr(STR, choices=("tensor", "layer")), "dim": Attr(INT)},
              # top/ is absent for blocks whose eigenvalues were not asked for (--block-spectra); older files
              # have it in every block
              members={"names": Data(STR, (None,)), "top": replace(_eigen(), optional=True), **TRACE})

SPECTRUM = Group(
    optional=True,  # absent with --no-spectrum
    attrs={"hvp_mode": Attr(STR), "graph_bytes": Attr(INT), "products": Attr(INT), "elapsed_s": Attr(FLOAT),
           "lanczos_basis": Attr(INT, required=False), "vector_bytes": Attr(INT, required=False)},
    members={
        "top": _eigen(),
        "bottom": _eigen(),
        **TRACE,
        "density": Group(members={"grid": Data(FLOAT, ("G",)), "density": Data(FLOAT, ("G",)),
                                  "nodes": Data(FLOAT, ("runs", "steps")),
                                  "weights": Data(FLOAT, ("runs", "steps"))},
                         attrs={"sigma": Attr(FLOAT), "runs": Attr(INT), "steps": Attr(INT), "seed": Attr(INT)},
                         dims={"G": 1, "runs": 0, "steps": 0}),
        "normalized_pseudo_hessian_eigenvalues": Data(FLOAT, ("S",)),
        "blocks": Group(attrs={"order": Attr(STR, (None,))}, each=BLOCK, rules=(_blocks_ordered,)),
    },
)

CHECKPOINT = Group(
    # What was analysed, and how: the API lets a record carry any subset, so each is checked when present.
    attrs={
        **{name: Attr(STR, required=False) for name in (
            "source", "sha256", "model", "model_kwargs", "dataset", "dataset_kwargs", "split", "loss",
            "direction", "partition", "device", "dtype", "strategy", "torch_version", "curvscope_version",
            "created", "subset", "frozen", "determinism_warning", "attention", "kfac_note",
            # issue #16: which output entry was analysed, tied tensors ("alias = name; …"), the BatchNorm mode
            # (eval | batch, "" without BatchNorm) with its warning and note, the groups that make C̄ singular
            "outputs", "tied", "batchnorm", "batchnorm_warning", "batchnorm_note", "collinear")},
        "curvature": Attr(STR, required=False, choices=tuple(KINDS)),  # absent in older files: the Hessian
        **{name: Attr(INT, required=False) for name in ("n_samples", "batch_size", "n_batches", "epoch", "seed",
                                                         "threads")},
        **{name: Attr(FLOAT, required=False) for name in ("loss_value", "gradient_s", "pseudo_s", "elapsed_s")},
    },
    members={
        "pseudo_gradient": Data(FLOAT, ("S",)),
        "partition": Group(members={"name": Data(STR, ("S",)),
                                    "kind": Data(STR, ("S",), choices=("weight", "bias", "other")),
                                    "layer": Data(STR, ("S",)),
                                    "size": Data(INT, ("S",))}),
        "pseudo_hessian": Data(FLOAT, ("S", "S")),
        "pseudo_hessian_stderr": Data(FLOAT, ("S", "S")),
        "pseudo_hessian_inverse": Data(FLOAT, ("S", "S"), attrs={
            "method": Attr(STR, choices=("inverse", "pseudo-inverse")), "condition_number": Attr(FLOAT),
            "positive_definite": Attr(BOOL), "rank": Attr(INT), "excluded": Attr(STR, (None,))}),
        "pseudo_hessian_eigenvalues": Data(FLOAT, ("S",)),
        "learning_rates": Data(FLOAT, ("S",)),
        "predicted_decrease": Data(FLOAT, ()),
        "interactions": INTERACTIONS,
        "spectrum": SPECTRUM,
        "order3": ORDER3,
    },
    dims={"S": 1},
    rules=(_kfac_of_its_curvature,),
)

RESULTS = Group(
    attrs={"format": Attr(STR, choices=(FORMAT,)), "schema_version": Attr(INT),
           "curvscope_version": Attr(STR, required=False)},
    members={"checkpoints": Group(optional=True, each=CHECKPOINT)},
)
