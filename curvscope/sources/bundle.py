"""The fields of a checkpoint bundle, checked before anything is built from them.

A bundle is somebody else's file. Every field is checked for type, and the
names it records (model, data set, loss) resolve only to curvscope's built-in
zoo, data sets and losses: a ``package.module:attr`` name read from a file would
import and call code of the file's choosing (``os:system`` with a ``command``
argument runs a shell command), so it is refused unless the user trusts the
file. Names the user gives (command line or API) are the user's own choice and
are not restricted here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from curvscope.errors import CurvscopeError

BUNDLE_FORMAT = "curvscope-checkpoint"
BUNDLE_VERSION = 1


@dataclass(frozen=True)
class BundleFields:
    """What a version-1 bundle records, each field of the type it must have."""

    model: str
    model_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    data: dict  # {"name": str, "kwargs": dict} or {}
    loss: str
    epoch: int
    training: dict


def is_bundle(obj: Any) -> bool:
    """Whether `obj` (what torch.load returned) claims to be a curvscope bundle."""
    return isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT


def _where(path: Path) -> str:
    return f"the checkpoint bundle {str(path)!r}"


def _kwargs(value: Any, field: str, path: Path) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CurvscopeError(f"{_where(path)} is damaged: its {field} is a {type(value).__name__}, not a mapping "
                             f"of argument names to values. Name the settings yourself on the command line.")
    return dict(value)


def recorded_name(value: Any, what: str, flag: str, path: Path, trust: bool) -> str:
    """A model, data or loss name read from a file: a non-empty string, and no plug-in unless `trust`."""
    if not isinstance(value, str) or not value:
        raise CurvscopeError(f"{_where(path)} is damaged: the {what} it records is a {type(value).__name__}, "
                             f"not a name. Name the {what} yourself with {flag}.")
    if ":" in value and not trust:
        raise CurvscopeError(
            f"{_where(path)} names the {what} {value!r}, which is not built into curvscope but code outside it; "
            f"curvscope never imports code that a file names. If the code is yours, name it yourself with "
            f"{flag} {value!r}; pass --trust-checkpoint only if you made the file and trust what it names.")
    return value


def _state_dict(value: Any, path: Path) -> dict[str, torch.Tensor]:
    if not (isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in value.items())):
        raise CurvscopeError(f"{_where(path)} is damaged: its state_dict is not a mapping of parameter names to "
                             f"tensors. Use an intact copy of the file.")
    return value


def read_bundle(obj: dict, path: Path, trust: bool, *, model: str | None = None,
                model_kwargs: dict | None = None, data: dict | None = None, loss: str | None = None) -> BundleFields:
    """The fields of the bundle `obj` read from `path`, the caller's `model`, `data` and `loss` taking
    precedence over what it records; raise CurvscopeError naming the first bad field that is used."""
    if obj.get("version") != BUNDLE_VERSION:
        raise CurvscopeError(f"{_where(path)} is of version {obj.get('version')!r}; this curvscope reads "
                             f"version {BUNDLE_VERSION}.")
    recorded = obj.get("model")
    if model is None or model_kwargs is None:
        if not isinstance(recorded, dict):
            raise CurvscopeError(f"{_where(path)} is damaged: it records no model (a mapping with a name and "
                                 f"kwargs). Name the model with --model and --model-kwargs.")
        model = model or recorded_name(recorded.get("name"), "model", "--model", path, trust)
        model_kwargs = model_kwargs if model_kwargs is not None else _kwargs(
            recorded.get("kwargs", {}), "model kwargs", path)
    if data is None:
        data = obj.get("data", {})
        if not isinstance(data, dict):
            raise CurvscopeError(f"{_where(path)} is damaged: its data entry is a {type(data).__name__}, not a "
                                 f"mapping. Name the data set with --data.")
        data = ({"name": recorded_name(data.get("name"), "data set", "--data", path, trust),
                 "kwargs": _kwargs(data.get("kwargs", {}), "data kwargs", path)} if data else {})
    epoch, training = obj.get("epoch", -1), obj.get("training", {})
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not -1 <= epoch < 2 ** 63:
        raise CurvscopeError(f"{_where(path)} is damaged: its epoch is {epoch!r}, not a whole number.")
    return BundleFields(model=model, model_kwargs=model_kwargs, state_dict=_state_dict(obj.get("state_dict"), path),
                        data=data, loss=loss or recorded_name(obj.get("loss", "cross_entropy"), "loss", "--loss",
                                                              path, trust),
                        epoch=epoch, training=training if isinstance(training, dict) else {})
