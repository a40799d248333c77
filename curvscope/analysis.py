"""From a checkpoint file to an analysis record: the data flow of `curvscope analyse`.

checkpoint → (model, loss, data) → engines (pseudo-Hessian, Newton step) →
:class:`AnalysisRecord`, which the store writes. No file is written here.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from curvscope import __version__
from curvscope.curvature.hvp import DEFAULT_MAX_MEMORY, HessianProducts
from curvscope.curvature.newton_step import newton_step
from curvscope.curvature.objective import Objective, Progress, no_progress
from curvscope.curvature.pseudo_hessian import pseudo_hessian
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.curvature.spectrum import DEFAULT_STEPS, DEFAULT_TOL, DEFAULT_TRACE_MATVECS, spectrum
from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import Interactions, interactions
from curvscope.results import NewtonStep, PseudoHessianResult, SpectrumResult
from curvscope.sources.checkpoint import Checkpoint, load_checkpoint
from curvscope.sources.datasets import analysis_batches, build_dataset
from curvscope.sources.losses import LossFn

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class AnalysisOptions:
    """What to analyse and how; the CLI fills it from its flags."""

    samples: int | None = None  # None: the whole split
    batch_size: int = 256
    partition: str = "canonical"
    split: str = "train"
    seed: int = 0
    random_subset: bool = False  # the `samples` drawn at random with `seed` instead of the first ones
    device: str = "cpu"
    dtype: str = "float32"
    strategy: str = "auto"
    model: str | None = None
    model_kwargs: dict | None = None
    data: str | None = None
    data_kwargs: dict | None = None
    loss: str | None = None
    trust_checkpoint: bool = False
    spectrum: bool = True
    top_k: int = 5
    lanczos_steps: int = DEFAULT_STEPS
    lanczos_tol: float = DEFAULT_TOL
    slq_runs: int = 1
    trace_matvecs: int = DEFAULT_TRACE_MATVECS
    max_memory: int = DEFAULT_MAX_MEMORY


@dataclass(frozen=True)
class AnalysisRecord:
    """Everything stored for one checkpoint: attributes and results."""

    label: str
    attrs: dict
    pseudo: PseudoHessianResult
    step: NewtonStep
    interactions: Interactions
    loss_after: np.ndarray  # L(θ − Σ η_s U_s) for each of interactions.steps
    spectrum: SpectrumResult | None = None


def resolve_device(name: str) -> torch.device:
    """The torch device `name`, refusing one this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CurvscopeError(f"unknown device {name!r}: use cpu or cuda[:i].") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CurvscopeError(f"device {name!r} was asked for, but no CUDA GPU is available here.")
    return device


def analyse_checkpoint(path: str | Path, options: AnalysisOptions, label: str | None = None,
                       progress: Progress = no_progress) -> AnalysisRecord:
    """Load `path`; compute ḡ, H̄, H̄⁻¹, the Newton step, the interaction measures with the actual
    loss after each step, and (unless turned off) the spectra."""
    start = time.perf_counter()
    if options.dtype not in DTYPES:
        raise CurvscopeError(f"unknown dtype {options.dtype!r}: use float32 or float64.")
    device = resolve_device(options.device)
    data_spec = ({"name": options.data, "kwargs": dict(options.data_kwargs or {})}
                 if options.data is not None else None)
    ckpt: Checkpoint = load_checkpoint(path, model=options.model, model_kwargs=options.model_kwargs,
                                       loss=options.loss, data=data_spec, trust=options.trust_checkpoint)
    if not ckpt.data.get("name"):
        raise CurvscopeError(f"{str(path)!r} does not record its data set: name one with --data.")
    torch.manual_seed(options.seed)
    data_kwargs = dict(ckpt.data.get("kwargs") or {})
    if options.data is None and options.data_kwargs:  # e.g. --data-root for the recorded data set
        data_kwargs.update(options.data_kwargs)
    data = build_dataset(ckpt.data["name"], options.split, data_kwargs)
    batches = analysis_batches(data, options.samples, options.batch_size,
                               seed=options.seed if options.random_subset else None)
    model = ckpt.model.to(device=device, dtype=DTYPES[options.dtype])  # placed once, not copied per engine
    warning = determinism_warning(model, ckpt.loss_fn, batches[0])
    pseudo = pseudo_hessian(model, ckpt.loss_fn, batches, options.partition, strategy=options.strategy,
                            progress=progress)
    step = newton_step(pseudo.pseudo_hessian, pseudo.pseudo_gradient)
    inter = interactions(pseudo.pseudo_gradient, pseudo.pseudo_hessian, pseudo.pseudo_hessian_stderr, step.inverse,
                         pseudo.kinds, pseudo.layers, step.positive_definite)
    _, after = loss_after_steps(model, ckpt.loss_fn, batches, options.partition,
                                [st.learning_rates for st in inter.steps])
    spec = None
    if options.spectrum:
        with HessianProducts.create(model, ckpt.loss_fn, batches, max_memory=options.max_memory,
                                    progress=progress) as hp:
            spec = spectrum(hp, k=options.top_k, tol=options.lanczos_tol, max_steps=options.lanczos_steps,
                            slq_runs=options.slq_runs, slq_steps=options.lanczos_steps,
                            trace_matvecs=options.trace_matvecs, seed=options.seed, progress=progress)
    attrs = {
        "source": str(Path(path).resolve()), "sha256": ckpt.sha256, "model": ckpt.model_name,
        "model_kwargs": _json(ckpt.model_kwargs), "dataset": ckpt.data["name"],
        "dataset_kwargs": _json(ckpt.data.get("kwargs", {})), "split": options.split,
        "n_samples": pseudo.n_samples, "batch_size": options.batch_size, "n_batches": pseudo.n_batches,
        "loss": ckpt.loss, "loss_value": pseudo.loss, "epoch": ckpt.epoch, "curvature": "hessian",
        "direction": "gradient", "partition": pseudo.partition, "seed": options.seed,
        "subset": "random (seeded)" if options.random_subset else "first",
        "device": str(device), "dtype": options.dtype, "strategy": pseudo.strategy,
        "torch_version": str(torch.__version__), "curvscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - start,
        "frozen": ", ".join(n for n, p in ckpt.model.named_parameters() if not p.requires_grad),
        "determinism_warning": warning or "",
    }
    return AnalysisRecord(label or default_label(path), attrs, pseudo, step, inter, after, spec)


def determinism_warning(model: torch.nn.Module, loss_fn: LossFn,
                        batch: tuple[torch.Tensor, torch.Tensor]) -> str | None:
    """A warning when two eval-mode passes over the same batch give different losses (else None).

    Curvature assumes a deterministic loss; dropout left active in eval mode, or
    a model that updates state in forward, breaks that.
    """
    obj = Objective.create(copy.deepcopy(model).eval(), loss_fn, [batch])  # a copy: forward may update state
    with torch.no_grad():
        try:
            a, b = (float(obj.batch_loss(0, finite=False)) for _ in range(2))
        except CurvscopeError:
            return None  # the engines report evaluation errors themselves
    if a != b and not (math.isnan(a) and math.isnan(b)):
        return (f"two passes over the same batch gave different losses ({a!r} and {b!r}) in eval mode: "
                f"the model is not deterministic (dropout or state updated in forward?), so the curvature "
                f"is of a random function.")
    return None


def default_label(path: str | Path) -> str:
    """The label of a checkpoint in a results file: its file stem."""
    return Path(path).stem


def _json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True)
