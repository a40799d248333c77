"""Checkpoint bundles: what was trained, on what, with which loss, and its weights.

A bundle (format "curvscope-checkpoint", version 1) is a plain dict that
`torch.load(weights_only=True)` opens, so loading never runs code from the file:

    {"format": "curvscope-checkpoint", "version": 1,
     "model": {"name": str, "kwargs": dict}, "state_dict": {name: Tensor},
     "data": {"name": str, "kwargs": dict}, "loss": str, "epoch": int,
     "training": {free-form metadata: optimiser, accuracies, command, ...}}

A plain state_dict is accepted too when the caller names the model.
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvscope.errors import CurvscopeError, summary
from curvscope.sources.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, is_bundle, read_bundle
from curvscope.sources.exported import Exported, load_exported_program  # noqa: F401 - Exported: re-exported
from curvscope.sources.losses import LossFn, build_loss
from curvscope.sources.zoo import MODELS, build_model


@dataclass
class Checkpoint:
    """A model rebuilt from a checkpoint file, with the loss and data spec it was trained with."""

    model: nn.Module
    loss_fn: LossFn
    loss: str
    model_name: str
    model_kwargs: dict
    data: dict = field(default_factory=dict)  # {"name": ..., "kwargs": {...}} or {} when unknown
    epoch: int = -1
    training: dict = field(default_factory=dict)
    source: str = ""
    sha256: str = ""


def save_checkpoint(path: str | Path, model: nn.Module, *, model_name: str, model_kwargs: dict,
                    data: dict, loss: str, epoch: int, training: dict | None = None) -> None:
    """Write a version-1 bundle of `model` to `path`."""
    bundle = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "model": {"name": model_name, "kwargs": dict(model_kwargs)},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "data": dict(data), "loss": loss, "epoch": int(epoch), "training": dict(training or {}),
    }
    torch.save(bundle, Path(path))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_pickle(path: Path) -> bool:
    """Whether `path` starts as a torch.save zip archive or a raw pickle (protocol 2 or later) does; the rest
    may still be damaged."""
    with path.open("rb") as fh:
        head = fh.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _read(path: Path, trust: bool = False) -> Any:
    if not path.exists():
        raise CurvscopeError(f"checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise CurvscopeError(f"checkpoint {str(path)!r} is not a file.")
    if path.stat().st_size == 0:
        raise CurvscopeError(f"checkpoint {str(path)!r} is empty (0 bytes).")
    if not _is_pickle(path):
        raise CurvscopeError(f"{str(path)!r} is not a PyTorch checkpoint (torch.save file): it is neither a zip "
                             f"archive nor a pickle.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a zip archive or pickle (checked above) with more than tensors in it
        if trust:
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as inner:  # noqa: BLE001 - the user's pickle may fail in any way
                raise CurvscopeError(f"{str(path)!r} could not be unpickled even with --trust-checkpoint: "
                                     f"{summary(inner)}.") from None
        raise CurvscopeError(
            f"{str(path)!r} holds Python objects (such as a pickled nn.Module) that can only be "
            "loaded by running code from the file, which curvscope refuses to do unless you trust "
            "the file: pass --trust-checkpoint if you made it yourself, or better, save the "
            "model's state_dict (or a curvscope bundle) and name the model with --model."
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails on damaged files in many ways (KeyError, ...)
        cause = summary(exc).split(". ")[0].rstrip(".")  # torch's zip reader appends paragraphs of advice
        raise CurvscopeError(f"{str(path)!r} is not a readable PyTorch checkpoint (damaged or truncated): "
                             f"{cause}.") from None


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "model.")


def _unwrap(obj: Any) -> tuple[dict | None, int]:
    """The state_dict in a plain or wrapped checkpoint ({"state_dict": ...}, ...) and its epoch (-1)."""
    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state(obj):
        return obj, -1
    if isinstance(obj, dict):
        epoch = obj.get("epoch", -1)
        for key in WRAPPER_KEYS:
            if is_state(obj.get(key)):
                return obj[key], int(epoch) if isinstance(epoch, int) else -1
    return None, -1


def _strip_prefixes(state: dict, own: dict) -> dict:
    """Drop a "module." (DataParallel) or "model." prefix shared by every key when the model's keys lack it."""
    while not set(state) <= set(own):
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _fitted(own: dict, state_dict: dict, path: Path) -> dict:
    """`state_dict` with its keys matched to the model's state `own`; an error naming every misfit."""
    state_dict = _strip_prefixes(state_dict, own)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected))
        if wrong:
            parts.append("wrong shape: " + "; ".join(wrong))
        raise CurvscopeError(f"the weights in {str(path)!r} do not fit the model ({'; '.join(parts)}).")
    return state_dict


def _model_with_weights(name: str, kwargs: dict, state_dict: dict, path: Path) -> nn.Module:
    """Build model `name` and load `state_dict` into it.

    A zoo model is first built on the meta device (no memory) and checked
    against the weights, so that arguments from a file cannot make curvscope
    allocate a model far larger than the weights the file holds.
    """
    if name in MODELS:
        with torch.device("meta"):
            _fitted(build_model(name, kwargs).state_dict(), state_dict, path)
    model = build_model(name, kwargs)
    model.load_state_dict(_fitted(model.state_dict(), state_dict, path))
    _check_finite(model, path)
    return model


STATISTICS = ("running_mean", "running_var")  # buffers of normalisation layers, which enter the loss in eval mode


def checked_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors of `model` that must be finite: every parameter (trainable or frozen) and the statistics that
    enter the loss (BatchNorm's running mean and variance, found by module or, in an exported program, by
    name). Other buffers are not checked: a causal mask of -inf above the diagonal is legitimate, and a buffer
    that does make the loss NaN or infinite is caught when the loss is evaluated."""
    out: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    for name, buf in model.named_buffers():
        if name.rpartition(".")[2] in STATISTICS:
            out.append((name, buf))
    return out


def _check_finite(model: nn.Module, path: Path) -> None:
    bad = [k for k, v in checked_tensors(model) if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CurvscopeError(f"{str(path)!r} has NaN or infinite values in {', '.join(bad)}.")


def _load_exported(path: Path, model: str | None, loss: str | None, data: dict | None,
                   trust: bool = False) -> Checkpoint:
    """A torch.export program (.pt2): its module, with the loss and data named on the command line."""
    net = load_exported_program(path, trust=trust)
    _check_finite(net, path)
    name = loss or "cross_entropy"
    return Checkpoint(model=net, loss_fn=build_loss(name), loss=name, model_name=model or "torch.export program",
                      model_kwargs={}, data=dict(data or {}), source=str(path), sha256=file_sha256(path))


def load_checkpoint(path: str | Path, *, model: str | None = None, model_kwargs: dict | None = None,
                    loss: str | None = None, data: dict | None = None, trust: bool = False) -> Checkpoint:
    """Rebuild model, loss and data spec from a checkpoint without running code from it.

    Reads a curvscope bundle, a plain state_dict, or a wrapped one
    ({"state_dict" | "model_state_dict" | "model": state_dict, "epoch": ...},
    keys possibly prefixed "module." or "model."), or a torch.export program
    (.pt2, exported with a dynamic batch dimension; see `curvscope.sources.exported`).
    Arguments given here override what the bundle records; a state_dict needs at
    least `model` (a zoo name or "package.module:factory"). A whole pickled
    nn.Module, or a .pt2 program whose members need more than torch's restricted
    unpickler, is loaded only with `trust=True`, as unpickling it runs code from the file.
    """
    path = Path(path)
    if path.suffix == ".pt2":
        return _load_exported(path, model, loss, data, trust)
    obj = _read(path, trust)
    if isinstance(obj, nn.Module):
        name = model or type(obj).__name__
        _check_finite(obj, path)
        return Checkpoint(model=obj.eval(), loss_fn=build_loss(
            loss or "cross_entropy"), loss=loss or "cross_entropy", model_name=name, model_kwargs={},
            data=dict(data or {}), source=str(path), sha256=file_sha256(path))
    if is_bundle(obj):
        fields = read_bundle(obj, path, trust, model=model, model_kwargs=model_kwargs, data=data, loss=loss)
        name, kwargs, state, loss_name = fields.model, fields.model_kwargs, fields.state_dict, fields.loss
        data_spec, epoch, training = fields.data, fields.epoch, fields.training
    elif _unwrap(obj)[0] is not None:
        if model is None:
            raise CurvscopeError(f"{str(path)!r} is a plain state_dict, which does not say which "
                                 "network it belongs to: name it with --model (a zoo name or "
                                 "package.module:factory).")
        unwrapped, epoch = _unwrap(obj)
        assert unwrapped is not None  # the elif's condition
        state = unwrapped
        name, kwargs = model, dict(model_kwargs or {})
        loss_name, data_spec, training = loss or "cross_entropy", dict(data or {}), {}
    else:
        raise CurvscopeError(f"{str(path)!r} is not a curvscope checkpoint bundle or a state_dict "
                             f"(it holds a {type(obj).__name__}"
                             f"{' with keys ' + ', '.join(map(str, list(obj)[:8])) if isinstance(obj, dict) else ''}).")
    net = _model_with_weights(name, kwargs, state, path)
    return Checkpoint(model=net.eval(), loss_fn=build_loss(loss_name), loss=loss_name,
                      model_name=name, model_kwargs=kwargs, data=data_spec, epoch=epoch,
                      training=training, source=str(path), sha256=file_sha256(path))
