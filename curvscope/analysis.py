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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from curvscope import __version__
from curvscope.curvature.kfac import kfac
from curvscope.curvature.kinds import KFAC_FLAVOUR_OF, record_label
from curvscope.curvature.newton_step import newton_step
from curvscope.curvature.objective import Objective, Progress, no_progress
from curvscope.curvature.operator import CurvatureOperator, full_gradient
from curvscope.curvature.partition import Partition, make_partition
from curvscope.curvature.registry import curvature_operator
from curvscope.curvature.spectrum import spectrum
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import Interactions, interactions
from curvscope.measures.kfac import kfac_measures
from curvscope.results import KFACResult, NewtonStep, PseudoHessianResult, SpectrumResult
from curvscope.settings import AnalysisOptions
from curvscope.sources.checkpoint import Checkpoint, load_checkpoint
from curvscope.sources.datasets import analysis_batches, build_dataset
from curvscope.sources.losses import LossFn

DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    kfac: KFACResult | None = None  # for the GGN and the Fisher, unless --kfac off or K-FAC was not possible


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
                       progress: Progress = no_progress) -> list[AnalysisRecord]:
    """Load `path`; for each of `options.curvatures`, compute ḡ, C̄, C̄⁻¹, the Newton step, the interaction
    measures with the actual loss after each step, K-FAC's K̄ beside Ḡ and F̄ (unless turned off), and
    (unless turned off) the spectra: one record each.

    The checkpoint, the data and the full gradient u are prepared once and shared by the curvatures.
    """
    start = time.perf_counter()
    ckpt, batches, model, device = _prepare(path, options)
    common = {
        "source": str(Path(path).resolve()), "sha256": ckpt.sha256, "model": ckpt.model_name,
        "model_kwargs": _json(ckpt.model_kwargs), "dataset": ckpt.data["name"],
        "dataset_kwargs": _json(ckpt.data.get("kwargs", {})), "split": options.split,
        "batch_size": options.batch_size, "loss": ckpt.loss, "epoch": ckpt.epoch, "direction": "gradient",
        "seed": options.seed, "subset": "random (seeded)" if options.random_subset else "first",
        "device": str(device), "dtype": options.dtype, "torch_version": str(torch.__version__),
        "curvscope_version": __version__,
        "frozen": ", ".join(n for n, p in ckpt.model.named_parameters() if not p.requires_grad),
        "determinism_warning": determinism_warning(model, ckpt.loss_fn, batches[0]) or "",
        "attention": attention_note(model),
    }
    part = make_partition(model, options.partition)
    gradient, gradient_s = None, 0.0
    records = []
    for curvature in options.curvatures:
        with curvature_operator(model, ckpt.loss_fn, batches, curvature, max_memory=options.max_memory,
                                progress=progress) as op:
            if gradient is None:  # one pass, shared by the curvatures
                gradient_s = time.perf_counter()
                gradient = full_gradient(op.obj, op.params, progress)
                gradient_s = time.perf_counter() - gradient_s
            pseudo_s = time.perf_counter()
            pseudo = op.projection(part, strategy=options.strategy, gradient=gradient, progress=progress)
            pseudo_s = time.perf_counter() - pseudo_s
            step = newton_step(pseudo.pseudo_hessian, pseudo.pseudo_gradient)
            inter = interactions(pseudo.pseudo_gradient, pseudo.pseudo_hessian, pseudo.pseudo_hessian_stderr,
                                 step.inverse, pseudo.kinds, pseudo.layers, step.positive_definite)
            kfac_parts, kfac_note = _kfac(op, part, gradient[0], pseudo, step, options, progress)
            spec = None if not options.spectrum else spectrum(
                op, k=options.top_k, tol=options.lanczos_tol, max_steps=options.lanczos_steps,
                slq_runs=options.slq_runs, slq_steps=options.lanczos_steps, trace_matvecs=options.trace_matvecs,
                seed=options.seed, progress=progress)
        etas = [st.learning_rates for st in inter.steps]
        if kfac_parts is not None:
            etas.append(kfac_parts.measures.step.learning_rates)
        _, after = loss_after_steps(model, ckpt.loss_fn, batches, part, etas, gradient=gradient)
        kf = None if kfac_parts is None else replace(kfac_parts, actual_decrease=pseudo.loss - float(after[-1]))
        attrs = {**common, "n_samples": pseudo.n_samples, "n_batches": pseudo.n_batches, "loss_value": pseudo.loss,
                 "curvature": curvature, "partition": pseudo.partition, "strategy": pseudo.strategy,
                 "kfac_note": kfac_note,
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "gradient_s": gradient_s, "pseudo_s": pseudo_s, "elapsed_s": time.perf_counter() - start}
        records.append(AnalysisRecord(record_label(label or default_label(path), curvature), attrs, pseudo, step,
                                      inter, after[:len(inter.steps)], spec, kf))
        start = time.perf_counter()
    return records


def _kfac(op: CurvatureOperator, part: Partition, u: list[torch.Tensor], pseudo: PseudoHessianResult,
          step: NewtonStep, options: AnalysisOptions, progress: Progress) -> tuple[KFACResult | None, str]:
    """K-FAC's K̄ and measures beside C̄ (actual decrease still unknown), or None and why not ("": not asked)."""
    if options.kfac == "off" or op.name not in KFAC_FLAVOUR_OF:
        return None, ""
    start = time.perf_counter()
    try:
        factors = kfac(op, "mc" if options.kfac == "mc" else None, approximation=options.kfac_approximation,
                       mc_samples=options.kfac_samples, seed=options.seed, progress=progress)
        kbar, rules = factors.projection(part, u, pseudo.pseudo_hessian)
    except CurvscopeError as exc:  # this model or partition has no K-FAC (the analysis itself goes on)
        return None, f"K-FAC not computed: {exc}"
    measures = kfac_measures(pseudo.pseudo_gradient, pseudo.pseudo_hessian, step.inverse, kbar, pseudo.kinds,
                             pseudo.layers, np.asarray(rules, dtype=str), step.positive_definite, factors.flavour)
    return KFACResult(factors.flavour, factors.approximation, factors.mc_samples, factors.seed,
                      time.perf_counter() - start, tuple(factors.exact), kbar, np.asarray(rules, dtype=str), measures,
                      float("nan")), ""


def _prepare(path: str | Path, options: AnalysisOptions,
             ) -> tuple[Checkpoint, list[tuple[torch.Tensor, torch.Tensor]], torch.nn.Module, torch.device]:
    """The checkpoint, its analysis batches, its model placed on the device in the dtype, and the device."""
    if options.dtype not in DTYPES:
        raise CurvscopeError(f"unknown dtype {options.dtype!r}: use float32 or float64.")
    device = resolve_device(options.device)
    data_spec = ({"name": options.data, "kwargs": dict(options.data_kwargs or {})}
                 if options.data is not None else None)
    ckpt: Checkpoint = load_checkpoint(path, model=options.model, model_kwargs=options.model_kwargs,
                                       loss=options.loss, data=data_spec, trust=options.trust_checkpoint)
    if not ckpt.data.get("name"):
        raise CurvscopeError(f"{str(path)!r} does not record its data set: name one with --data.")
    dim = sum(p.numel() for p in ckpt.model.parameters() if p.requires_grad)
    if options.spectrum and options.top_k > dim:
        raise CurvscopeError(f"--top-k {options.top_k} asks for more eigenvalues at each end than the model's "
                             f"{dim} trainable parameters give: lower --top-k to at most {dim}.")
    torch.manual_seed(options.seed)
    data_kwargs = dict(ckpt.data.get("kwargs") or {})
    if options.data is None and options.data_kwargs:  # e.g. --data-root for the recorded data set
        data_kwargs.update(options.data_kwargs)
    data = build_dataset(ckpt.data["name"], options.split, data_kwargs)
    batches = analysis_batches(data, options.samples, options.batch_size,
                               seed=options.seed if options.random_subset else None)
    model = ckpt.model.to(device=device, dtype=DTYPES[options.dtype])  # placed once, not copied per engine
    return ckpt, batches, model, device


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


def attention_note(model: torch.nn.Module) -> str:
    """What the output says of attention: the curvature passes ran its math backend (see Objective), or ""."""
    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)
             or type(m).__name__.lower().endswith(("attention", "selfattention", "attn"))]
    if not found:
        return ""
    return (f"attention ({len(found)} module{'s' if len(found) > 1 else ''}, e.g. {found[0] or 'the model'}) ran "
            f"under PyTorch's math backend: its fused kernels have no second derivative; values are the same")


def default_label(path: str | Path) -> str:
    """The label of a checkpoint in a results file: its file stem."""
    return Path(path).stem


def _json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True)
