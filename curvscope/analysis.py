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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from curvscope import __version__
from curvscope.curvature.defaults import BATCHNORM_MODES
from curvscope.curvature.hessian import HessianOperator
from curvscope.curvature.kfac import kfac
from curvscope.curvature.kinds import KFAC_FLAVOUR_OF, record_label
from curvscope.curvature.newton_step import collinear_description, collinear_groups, newton_step
from curvscope.curvature.objective import (
    Objective,
    OutputKey,
    Progress,
    batchnorm_modules,
    no_progress,
    output_description,
    raw_outputs,
)
from curvscope.curvature.operator import CurvatureOperator, full_gradient
from curvscope.curvature.partition import Partition, make_partition, tied_description
from curvscope.curvature.ranks import all_sum_array, join, shard
from curvscope.curvature.registry import curvature_operator
from curvscope.curvature.spectrum import spectrum, spectrum_memory
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.errors import CurvscopeError
from curvscope.measures.cubic import DAMPING_GRID, cubic_learning_rates
from curvscope.measures.interactions import Interactions, Step, interactions
from curvscope.measures.kfac import kfac_measures
from curvscope.results import KFACResult, NewtonStep, Order3Result, PseudoHessianResult, SpectrumResult
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
    order3: Order3Result | None = None  # for the Hessian with --order3


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

    The checkpoint, the data and the full gradient u are prepared once and shared by the curvatures. With
    `options.threads`, torch computes with that many CPU threads, and the number it had is restored after.
    """
    with _threads(options.threads):
        return _analyse(path, options, label, progress)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to n (left as they are when None) inside the block, restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _analyse(path: str | Path, options: AnalysisOptions, label: str | None, progress: Progress,
             ) -> list[AnalysisRecord]:
    start = time.perf_counter()
    ckpt, batches, model, device = _prepare(path, options)
    common = {
        "source": str(Path(path).resolve()), "sha256": ckpt.sha256, "model": ckpt.model_name,
        "model_kwargs": _json(ckpt.model_kwargs), "dataset": ckpt.data["name"],
        "dataset_kwargs": _json(ckpt.data.get("kwargs", {})), "split": options.split,
        "batch_size": options.batch_size, "loss": ckpt.loss, "epoch": ckpt.epoch, "direction": "gradient",
        "seed": options.seed, "subset": "random (seeded)" if options.random_subset else "first",
        "device": str(device), "dtype": options.dtype, "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "curvscope_version": __version__,
        "frozen": ", ".join(n for n, p in ckpt.model.named_parameters() if not p.requires_grad),
        "determinism_warning": determinism_warning(model, ckpt.loss_fn, batches[0], output_key=options.output_key,
                                                   batchnorm=options.batchnorm) or "",
        "attention": attention_note(model),
        "outputs": outputs_note(model, batches[0], options.output_key, options.batchnorm),
        "tied": tied_description(model),
        "batchnorm": options.batchnorm if batchnorm_modules(model) else "",
        "batchnorm_warning": batchnorm_warning(model, ckpt.loss_fn, batches, options.output_key, options.batchnorm),
    }
    part = make_partition(model, options.partition)
    gradient, gradient_s = None, 0.0
    records = []
    for curvature in options.curvatures:
        with curvature_operator(model, ckpt.loss_fn, batches, curvature, max_memory=options.max_memory,
                                progress=progress) as op:
            op.obj.configure(options.output_key, options.batchnorm)  # every engine sees them through op.obj
            if gradient is None:  # one pass, shared by the curvatures
                gradient_s = time.perf_counter()
                gradient = full_gradient(op.obj, op.params, progress)
                gradient_s = time.perf_counter() - gradient_s
            pseudo_s = time.perf_counter()
            pseudo = op.projection(part, strategy=options.strategy, gradient=gradient, progress=progress)
            pseudo_s = time.perf_counter() - pseudo_s
            step = newton_step(pseudo.pseudo_hessian, pseudo.pseudo_gradient)
            collinear = "" if step.method == "inverse" else collinear_description(
                [str(n) for n in pseudo.names], collinear_groups(pseudo.pseudo_hessian, pseudo.pseudo_gradient))
            inter = interactions(pseudo.pseudo_gradient, pseudo.pseudo_hessian, pseudo.pseudo_hessian_stderr,
                                 step.inverse, pseudo.kinds, pseudo.layers, step.positive_definite)
            kfac_parts, kfac_note = _kfac(op, part, gradient[0], pseudo, step, options, progress)
            order3 = _order3(op, part, gradient, pseudo, options, progress)
            spec = None if not options.spectrum else spectrum(
                op, k=options.top_k, tol=options.lanczos_tol, max_steps=options.lanczos_steps,
                slq_runs=options.slq_runs, slq_steps=options.lanczos_steps, trace_matvecs=options.trace_matvecs,
                seed=options.seed, blocks=options.block_spectra, max_memory=options.max_memory, progress=progress)
        n_steps = len(inter.steps)
        etas = [st.learning_rates for st in inter.steps]
        if kfac_parts is not None:
            etas.append(kfac_parts.measures.step.learning_rates)
        cubic_at = len(etas)
        if order3 is not None:  # every λ_int's step, the figure's grid and those asked for, each evaluated once
            etas += [st.learning_rates for st in order3.steps]
        finite = [bool(np.all(np.isfinite(e))) for e in etas]  # a step not found has NaN learning rates
        _, kept = loss_after_steps(model, ckpt.loss_fn, batches, part, [e for e, ok in zip(etas, finite) if ok],
                                   gradient=gradient, output_key=options.output_key, batchnorm=options.batchnorm)
        after = _spread(kept, finite)
        kf = None if kfac_parts is None else replace(kfac_parts, actual_decrease=pseudo.loss - float(after[n_steps]))
        if order3 is not None:  # the cubic steps asked for join the interaction steps, with their losses
            order3 = replace(order3, actual_decrease=pseudo.loss - after[cubic_at:])
            inter = replace(inter, steps=inter.steps + cubic_steps(order3, inter))
            after = np.concatenate([after[:n_steps], after[cubic_at:][order3.requested]])
        attrs = {**common, "n_samples": pseudo.n_samples, "n_batches": pseudo.n_batches, "loss_value": pseudo.loss,
                 "curvature": curvature, "partition": pseudo.partition, "strategy": pseudo.strategy,
                 "kfac_note": kfac_note, "collinear": collinear,
                 "batchnorm_note": batchnorm_note(curvature, kf is not None) if common["batchnorm"] == "batch" else "",
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "gradient_s": gradient_s, "pseudo_s": pseudo_s, "elapsed_s": time.perf_counter() - start}
        records.append(AnalysisRecord(record_label(label or default_label(path), curvature), attrs, pseudo, step,
                                      inter, after[:len(inter.steps)], spec, kf, order3))
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


def _order3(op: CurvatureOperator, part: Partition, gradient: tuple[list[torch.Tensor], float],
            pseudo: PseudoHessianResult, options: AnalysisOptions, progress: Progress) -> Order3Result | None:
    """D and the cubic-regularised learning rates for every λ_int asked for and of the figure's grid (actual
    decreases still unknown); None unless --order3 on a Hessian record."""
    if not options.order3 or not isinstance(op, HessianOperator):
        return None
    start = time.perf_counter()
    d, stderr = op.order3(part, gradient, progress)
    lams = sorted(set(options.damping_int) | set(DAMPING_GRID))
    steps = tuple(cubic_learning_rates(pseudo.pseudo_hessian, pseudo.pseudo_gradient, d, lam) for lam in lams)
    return Order3Result(d, stderr, steps, np.array([lam in options.damping_int for lam in lams]),
                        np.full(len(lams), np.nan), time.perf_counter() - start)


def cubic_steps(order3: Order3Result, inter: Interactions) -> list[Step]:
    """The cubic-regularised steps the user asked for, as interaction steps: predicted decrease q₃(η), and
    efficiency q₃(η)/q* (q* Newton's, when H̄ is positive definite); NaN when no step was found."""
    q_star = inter.step("newton").predicted
    return [Step(f"cubic (λ_int={st.damping_int:g})", "cubic", "", st.learning_rates, st.predicted_decrease,
                 st.predicted_decrease / q_star if inter.positive_definite and q_star > 0 else float("nan"))
            for st, asked in zip(order3.steps, order3.requested) if asked]


def _spread(values: np.ndarray, kept: list[bool]) -> np.ndarray:
    """`values` (one per kept entry) in place of the kept entries of a list of len(kept); NaN elsewhere."""
    out = np.full(len(kept), np.nan)
    out[np.flatnonzero(kept)] = values
    return out


def _prepare(path: str | Path, options: AnalysisOptions,
             ) -> tuple[Checkpoint, list[tuple[torch.Tensor, torch.Tensor]], torch.nn.Module, torch.device]:
    """The checkpoint, its analysis batches, its model placed on the device in the dtype, and the device."""
    if options.dtype not in DTYPES:
        raise CurvscopeError(f"unknown dtype {options.dtype!r}: use float32 or float64.")
    name, _ = join(options.device)  # under torchrun: this process's rank of the run, and its GPU
    device = resolve_device(name)
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
    if options.spectrum:  # before any work: the spectra's vectors must fit --max-memory
        spectrum_memory(dim, options.top_k, options.lanczos_steps, options.trace_matvecs, options.max_memory)
    torch.manual_seed(options.seed)
    data_kwargs = dict(ckpt.data.get("kwargs") or {})
    if options.data is None and options.data_kwargs:  # e.g. --data-root for the recorded data set
        data_kwargs.update(options.data_kwargs)
    data = build_dataset(ckpt.data["name"], options.split, data_kwargs)
    batches = shard(analysis_batches(data, options.samples, options.batch_size,  # this rank's share
                                     seed=options.seed if options.random_subset else None))
    model = ckpt.model.to(device=device, dtype=DTYPES[options.dtype])  # placed once, not copied per engine
    return ckpt, batches, model, device


def determinism_warning(model: torch.nn.Module, loss_fn: LossFn, batch: tuple[torch.Tensor, torch.Tensor], *,
                        output_key: OutputKey = None, batchnorm: str = "eval") -> str | None:
    """A warning when two eval-mode passes over the same batch give different losses (else None).

    Curvature assumes a deterministic loss; dropout left active in eval mode, or
    a model that updates state in forward, breaks that.
    """
    obj = Objective.create(copy.deepcopy(model).eval(), loss_fn, [batch],  # a copy: forward may update state
                           output_key=output_key, batchnorm=batchnorm)
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


def outputs_note(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], output_key: OutputKey,
                 batchnorm: str) -> str:
    """Which entry of the model's output the curvature is of ("'logits' of a CausalLMOutput (tensor (4, 7, 50))"),
    or "" when the model returns a tensor (or cannot be evaluated: the engines report that themselves)."""
    was = model.training
    try:
        with torch.no_grad():
            x = Objective.create(model, lambda z, y: z, [batch]).place(batch[0])
            return output_description(raw_outputs(model.eval(), x, batchnorm=batchnorm), output_key)
    except Exception:  # noqa: BLE001 - the model is the user's code; its errors are reported by the engines
        return ""
    finally:
        model.train(was)


BATCHNORM_RATIO, BATCHNORM_GAP = 2.0, 1.0  # the eval-mode loss is far from the batch-statistics loss beyond these


def batchnorm_warning(model: torch.nn.Module, loss_fn: LossFn, batches: list[tuple[torch.Tensor, torch.Tensor]],
                      output_key: OutputKey = None, batchnorm: str = "eval") -> str:
    """A warning when BatchNorm's running statistics give a loss far from the one each batch's own statistics give
    (one larger than the other by a factor over BATCHNORM_RATIO, or by more than BATCHNORM_GAP nats), else "".

    Running statistics that do not describe the analysed data (stale, or never updated because training ran in
    eval mode) make the eval-mode loss, and its curvature, those of another function than the one trained.
    Only for models with a BatchNorm layer that keeps running statistics; neither pass changes them.
    """
    if not any(m.track_running_stats and m.running_mean is not None for _, m in batchnorm_modules(model)):
        return ""
    was = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad():
            for mode in BATCHNORM_MODES:
                obj = Objective.create(model, loss_fn, batches, output_key=output_key, batchnorm=mode)
                losses.append(float(all_sum_array([sum(w * float(obj.batch_loss(b, finite=False))
                                                       for b, w in enumerate(obj.weights))])[0]))
    except CurvscopeError:
        return ""  # the engines report evaluation errors themselves
    finally:
        model.train(was)
    running, own = losses
    why = batchnorm_gap(running, own)
    if not why:
        return ""
    analysed = ("running statistics (--batchnorm eval; --batchnorm batch analyses the other)" if batchnorm == "eval"
                else "each batch's own statistics (--batchnorm batch)")
    return (f"the loss with BatchNorm's running statistics ({running:.4g}) is far from the loss with each batch's "
            f"own statistics ({own:.4g}): {' and '.join(why)}. The running statistics do not describe this data "
            f"(stale, or not updated during training?); this record is of the loss with {analysed}.")


def batchnorm_gap(running: float, own: float) -> list[str]:
    """Why the loss with running statistics and the loss with each batch's own are far apart, one reason per
    criterion that holds ("ratio 238 > 2", "difference 713 > 1", or one of them not finite); [] when near."""
    if math.isfinite(running) != math.isfinite(own):
        return ["one of them is not finite"]
    why = []
    if min(running, own) > 0 and max(running, own) / min(running, own) > BATCHNORM_RATIO:
        why.append(f"ratio {max(running, own) / min(running, own):.3g} > {BATCHNORM_RATIO:g}")
    if math.isfinite(running) and abs(running - own) > BATCHNORM_GAP:
        why.append(f"difference {abs(running - own):.3g} > {BATCHNORM_GAP:g}")
    return why


def batchnorm_note(curvature: str, with_kfac: bool) -> str:
    """What --batchnorm batch means for a record of `curvature` (with K-FAC beside it or not)."""
    note = ("BatchNorm used each batch's own statistics (--batchnorm batch): a sample's outputs depend on the rest "
            "of its batch, so the loss and its curvature depend on the batch size and order")
    if curvature == "fisher":
        note += ("; the Fisher's per-sample losses are each sample's loss within its batch, not alone, so F only "
                 "approximates the Fisher of independent samples")
    if with_kfac:
        note += "; K-FAC's per-sample factors ignore the coupling of samples through the statistics (approximate)"
    return note


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
