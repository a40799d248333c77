"""The loss over the analysis set, L(θ) = Σ_b (n_b / N) L_b(θ), batch by batch.

Every forward pass runs under PyTorch's math attention backend: the fused
scaled-dot-product attention kernels (used by ``nn.MultiheadAttention`` and
most transformer code) have no double backward, and the math backend gives
the same values with every derivative.

Batches are (inputs, targets) pairs; L_b is the batch-mean loss. Every engine
goes through :class:`Objective`, so all of them weight batches the same way and
put inputs on the model's device and dtype.

**Models as they come.** Every place that calls the model (the loss, the GGN's
and the Fisher's functional model, K-FAC's forward pass, the loss after a
step, the determinism check) goes through :func:`model_outputs`, which takes
the predictions out of what the model returns by one rule
(:func:`predictions`):

- a tensor is the predictions (an ``output_key`` is then refused: there is
  nothing to choose from);
- from a mapping (a dict, a Hugging Face ``ModelOutput``), a tuple or list
  (a named tuple included) or an object with attributes: the entry
  ``output_key`` when given (a key or attribute name; for a tuple or list an
  integer index, given as an int or as a string of digits such as "0" or
  "-1"; a ``ModelOutput`` is indexed like its ``to_tuple()``: its entries that
  are not None); else the entry ``logits`` when there is one; else the first
  entry that is a tensor;
- anything else, an entry that is not a tensor, or a key that does not exist
  is refused with a message naming what the model returned.

The loss then receives that tensor. **BatchNorm.** ``batchnorm="eval"`` (the
default) evaluates BatchNorm layers with their running statistics, as eval
mode does. ``batchnorm="batch"`` normalises by each batch's own statistics:
during each forward pass every ``nn.modules.batchnorm._BatchNorm`` is put in
training mode with ``track_running_stats`` off (what
``torch.func.replace_all_batch_norm_modules_`` does), so that its running
statistics and ``num_batches_tracked`` are neither used nor updated, and both
flags are restored afterwards (:func:`batchnorm_mode`). A sample's outputs then
depend on the other samples of its batch: the Hessian and the GGN are exact for
that batch function, while the Fisher's per-sample losses (and K-FAC's
per-sample factors) treat each sample's loss as if it were its own alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope.curvature.data_conv import data_convolutions
from curvscope.curvature.defaults import BATCHNORM_MODES
from curvscope.curvature.ranks import all_sum_array, world
from curvscope.errors import CurvscopeError, summary
from curvscope.sources.losses import LossFn

Batch = tuple[torch.Tensor, torch.Tensor]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def no_progress(stage: str, done: int, total: int) -> None:
    """A progress callback that shows nothing."""


def reported(progress: Progress, stage: str, count: int) -> Iterator[int]:
    """0, 1, …, count − 1, reporting (stage, 0, count) before the first, so that a stage shows as started when
    its work starts, and (stage, b + 1, count) after each."""
    progress(stage, 0, count)
    for b in range(count):
        yield b
        progress(stage, b + 1, count)


def differentiate(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                  **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad``, with a model that PyTorch cannot differentiate (twice) reported as bad input."""
    try:
        return torch.autograd.grad(outputs, inputs, **kwargs)
    except RuntimeError as exc:
        raise CurvscopeError(f"PyTorch cannot differentiate this model as curvature needs ({summary(exc)}): an "
                             f"operation it uses has no (second) derivative in this PyTorch; replace that "
                             f"operation or analyse another model.") from None


OutputKey = str | int | None
OUTPUT_RULE = ("the entry named by --output-key when given (a key, or an index for a tuple), else 'logits' when "
               "present, else the first tensor")


def _kind(value: Any) -> str:
    """A value as messages show it: a tensor by its shape, anything else by its type."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    return "None" if value is None else type(value).__name__


def _returned(out: Any) -> str:
    """What a model returned, for messages."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with " + (", ".join(f"{k!r}: {_kind(v)}" for k, v in out.items())
                                                  or "no entries")
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of " + (", ".join(_kind(v) for v in out) or "nothing")
    return f"a {type(out).__name__}"


def _index(key: OutputKey) -> int | None:
    """`key` as an integer index (an int, or a string of digits with an optional minus sign), else None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.lstrip("-").isdigit() and key.count("-") <= int(key.startswith("-")):
        return int(key)
    return None


def _select(out: Any, key: OutputKey) -> tuple[Any, str]:
    """The entry of a model's output that holds the predictions, and how it is named (see the module docstring)."""
    def refuse(why: str) -> CurvscopeError:
        return CurvscopeError(f"{why}; the model returned {_returned(out)}. curvscope takes the predictions by this "
                              f"rule: {OUTPUT_RULE} (--output-key, or Objective.output_key in Python).")

    if isinstance(out, torch.Tensor):
        if key is not None:
            raise refuse(f"an output key ({key!r}) was given, but the model returns one tensor, which is the "
                         f"predictions: drop the output key")
        return out, ""
    if isinstance(out, Mapping):
        if key is not None:
            if key in out:
                return out[key], repr(key)
            idx = _index(key)
            present = [(k, v) for k, v in out.items() if v is not None]  # how a ModelOutput indexes (to_tuple)
            if idx is not None and -len(present) <= idx < len(present):
                return present[idx][1], repr(present[idx][0])
            raise refuse(f"the model's output has no entry {key!r}")
        if "logits" in out:
            return out["logits"], "'logits'"
        found = next(((k, v) for k, v in out.items() if isinstance(v, torch.Tensor)), None)
        if found is None:
            raise refuse("the model's output holds no tensor")
        return found[1], repr(found[0])
    if isinstance(out, (tuple, list)):
        fields = tuple(getattr(out, "_fields", ()))  # a named tuple
        if key is not None:
            if isinstance(key, str) and key in fields:
                return getattr(out, key), repr(key)
            idx = _index(key)
            if idx is not None and -len(out) <= idx < len(out):
                return out[idx], f"item {idx}"
            raise refuse(f"the model's output has no {'entry' if fields else 'item'} {key!r}")
        if "logits" in fields:
            return out[fields.index("logits")], "'logits'"
        found_item = next(((i, v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)), None)
        if found_item is None:
            raise refuse("the model's output holds no tensor")
        return found_item[1], f"item {found_item[0]}"
    if key is not None and isinstance(key, str) and hasattr(out, key):
        return getattr(out, key), repr(key)
    if key is None and isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits, "'logits'"
    raise refuse("curvscope cannot find the predictions in the model's output" if key is None
                 else f"the model's output has no attribute {key!r}")


def predictions(out: Any, output_key: OutputKey = None) -> torch.Tensor:
    """The predictions in what a model returned: `out` itself when a tensor, else the entry the rule of the module
    docstring picks (`output_key`, else 'logits', else the first tensor). Refused (:class:`CurvscopeError`) when
    there is none, or when the entry picked is not a tensor."""
    value, name = _select(out, output_key)
    if not isinstance(value, torch.Tensor):
        raise CurvscopeError(f"the model's output {name} is {_kind(value)}, not a tensor of predictions; the model "
                             f"returned {_returned(out)}: name the entry that holds them with --output-key.")
    return value


def output_description(out: Any, output_key: OutputKey = None) -> str:
    """Which entry of `out` :func:`predictions` takes, in words ("" when the model returns a tensor)."""
    value, name = _select(out, output_key)
    return "" if not name else f"{name} of a {type(out).__name__} ({_kind(value)})"


def _check_batchnorm(mode: str) -> None:
    if mode not in BATCHNORM_MODES:
        raise CurvscopeError(f"unknown BatchNorm mode {mode!r}: choose one of {', '.join(BATCHNORM_MODES)}.")


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm layer (``nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d, Sync...)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batchnorm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within: BatchNorm layers use their running statistics ("eval": nothing changes) or each batch's own
    ("batch": training mode with ``track_running_stats`` off, so the running statistics and
    ``num_batches_tracked`` are neither used nor updated); both flags are restored on leaving."""
    _check_batchnorm(mode)
    changed = [(m, m.training, m.track_running_stats) for _, m in batchnorm_modules(model)] if mode == "batch" else []
    try:
        for m, _, _ in changed:
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, training, track in changed:
            m.training, m.track_running_stats = training, track


def raw_outputs(model: nn.Module, x: torch.Tensor, *, batchnorm: str = "eval",
                params: Mapping[str, torch.Tensor] | None = None) -> Any:
    """What `model` returns on inputs `x` (with its tensors replaced by `params` through ``functional_call`` when
    given; tied weights stay tied), under the math attention backend and the BatchNorm mode `batchnorm`."""
    with sdpa_kernel(SDPBackend.MATH), batchnorm_mode(model, batchnorm):  # fused attention: no double backward
        return model(x) if params is None else functional_call(model, dict(params), (x,))


def model_outputs(model: nn.Module, x: torch.Tensor, *, output_key: OutputKey = None, batchnorm: str = "eval",
                  params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The predictions of `model` on inputs `x`: :func:`raw_outputs`, taken from what the model returns by
    :func:`predictions`. The one way curvscope calls a model."""
    return predictions(raw_outputs(model, x, batchnorm=batchnorm, params=params), output_key)


@dataclass
class Objective:
    """A model in eval mode, a batch-mean loss and the batches of the analysis set.

    `output_key` says which entry of the model's output holds the predictions (see :func:`predictions`) and
    `batchnorm` which statistics BatchNorm layers use ("eval" or "batch", see :func:`batchnorm_mode`); every
    engine calls the model through :meth:`outputs`, so all of them see the same function. Both may be set
    (:meth:`configure`) on an operator's ``obj`` before its first use.
    """

    model: nn.Module
    loss_fn: LossFn
    batches: Sequence[Batch]
    output_key: OutputKey = None
    batchnorm: str = "eval"
    n_total: int = 0  # N over every rank of a distributed run (0: this process's own count)

    def __post_init__(self) -> None:
        self.configure(self.output_key, self.batchnorm)

    @classmethod
    def create(cls, model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *, output_key: OutputKey = None,
               batchnorm: str = "eval") -> "Objective":
        """Materialise `batches` (several passes are made over them) and check they are usable."""
        kept = [(x, y) for x, y in batches]
        local = sum(int(x.shape[0]) for x, _ in kept)
        rank, size = world()
        if not kept or local == 0:
            where = f" of rank {rank} (each process of a distributed run needs its own batches)" if size > 1 else ""
            raise CurvscopeError(f"the analysis set{where} is empty: no batch holds a sample.")
        total = int(all_sum_array([local])[0])
        return cls(model, loss_fn, kept, output_key, batchnorm, total)

    def configure(self, output_key: OutputKey = None, batchnorm: str = "eval") -> "Objective":
        """Set which output entry holds the predictions and which statistics BatchNorm uses (checked); `self`."""
        _check_batchnorm(batchnorm)
        if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (str, int))):
            raise CurvscopeError(f"the output key must be a string or an integer index, not {output_key!r}.")
        self.output_key, self.batchnorm = output_key, batchnorm
        return self

    def outputs(self, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model's predictions on inputs `x` (already placed), with its tensors replaced by `params` when given:
        :func:`model_outputs` with this objective's output key and BatchNorm mode."""
        return model_outputs(self.model, x, output_key=self.output_key, batchnorm=self.batchnorm, params=params)

    @property
    def local_samples(self) -> int:
        """The samples of this process's batches."""
        return sum(int(x.shape[0]) for x, _ in self.batches)

    @property
    def n_samples(self) -> int:
        """N, the samples of the whole analysis set (over every rank of a distributed run)."""
        return self.n_total or self.local_samples

    @property
    def weights(self) -> list[float]:
        """n_b / N for each of this process's batches."""
        n = self.n_samples
        return [int(x.shape[0]) / n for x, _ in self.batches]

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the model's device (and dtype, when floating point)."""
        ref = next(self.model.parameters())
        return t.to(ref.device, ref.dtype) if t.is_floating_point() else t.to(ref.device)

    def batch_loss(self, b: int, finite: bool = True) -> torch.Tensor:
        """L_b, the mean loss of batch b, differentiable in the parameters; refuses NaN or Inf unless not `finite`."""
        x, y = self.batches[b]
        try:
            value = self.loss_fn(self.outputs(self.place(x)), self.place(y))
        except CurvscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model and the loss are the user's code
            raise CurvscopeError(f"the model and loss cannot be evaluated on batch {b} "
                                 f"(inputs {tuple(x.shape)}, targets {tuple(y.shape)}): {summary(exc)}") from None
        if not isinstance(value, torch.Tensor):
            raise CurvscopeError(f"the loss must return a scalar tensor; it returned a {type(value).__name__}.")
        if value.dim() != 0:
            raise CurvscopeError(f"the loss must be a batch mean (a scalar); it returned shape {tuple(value.shape)}.")
        if finite and not math.isfinite(float(value.detach())):
            raise CurvscopeError(f"the loss is {float(value.detach())} on batch {b}: curvature is undefined "
                                 "there (check the weights and the data for NaN, Inf or overflow).")
        return value

    def gradient_with_graph(self, b: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """∇L_b with its graph kept for differentiating again (zeros for tensors L_b does not use).

        Convolutions of the data record a leaner graph (see data_conv); values are unchanged.
        """
        with data_convolutions(self.model):
            loss = self.batch_loss(b)
        grads = differentiate(loss, params, create_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
