"""Curvature spectra: extreme eigenvalues (Lanczos), traces (Hutch++) and densities (SLQ).

Of any curvature operator (the Hessian by default). Public API (docs/DESIGN.md §3): :func:`eigenvalues`, :func:`trace`,
:func:`spectral_density`, each over the analysis set `batches` with exact
n_b/N batch weights, for the whole model or one diagonal block (`group`: a
tensor name such as "conv1.weight" or a layer name such as "conv1").
:func:`spectrum` computes everything `curvscope analyse` stores, reusing one
set of kept graphs.
"""
from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from torch import nn

from curvscope.curvature import ranks
from curvscope.curvature.defaults import DEFAULT_MAX_MEMORY, DEFAULT_STEPS, DEFAULT_TOL, DEFAULT_TRACE_MATVECS
from curvscope.curvature.hutchpp import hutchpp, hutchpp_memory, hutchpp_parts
from curvscope.curvature.kinds import DEFAULT_CURVATURE
from curvscope.curvature.lanczos import (
    default_basis,
    extreme_eigenpairs,
    lanczos_memory,
    quadrature,
    random_start,
    slq_memory,
)
from curvscope.curvature.objective import Batch, Progress, no_progress
from curvscope.curvature.operator import BlockOperator, CurvatureOperator
from curvscope.curvature.registry import curvature_operator
from curvscope.errors import CurvscopeError
from curvscope.measures.density import DEFAULT_WIDTH, gaussian_density
from curvscope.results import BlockSpectrum, DensityResult, EigenResult, SpectrumResult, TraceResult
from curvscope.sizes import format_bytes
from curvscope.sources.losses import LossFn

#: SLQ keeps no Lanczos basis: measured on 4000x4000 test spectra and the shipped LeNet-5's Hessian, its density
#: at the default width matches full reorthogonalisation's to 1e-9 of the peak (moments to 1e-14), with 4 vectors
#: held instead of steps + 2; its nodes hold ghost copies of converged outliers, their weight split between them.
SLQ_REORTHOGONALISE = "none"

T = TypeVar("T")


def fitted_basis(n: int, k: int, budget: int) -> int:
    """The largest Lanczos basis, up to the default, whose vectors fit `budget` bytes (at least k + 2: the
    caller says when even that does not fit)."""
    basis = default_basis(k)
    while basis > k + 2 and lanczos_memory(n, k, basis) > budget:
        basis -= 1
    return basis


BUDGET = "the memory budget (--max-memory, or the operator's max_memory)"


def _refuse_beyond(held: int, budget: int, what: str, remedy: str, budget_name: str = BUDGET) -> None:
    """Refuse a computation whose float64 vectors (`held` bytes) do not fit the memory budget."""
    if held > budget:
        raise CurvscopeError(f"{what} need {format_bytes(held)} of float64 vectors and {budget_name} allows "
                             f"{format_bytes(budget)}: {remedy}.")


def _basis_within(n: int, k: int, budget: int) -> int:
    """:func:`fitted_basis`, refused when even the smallest basis does not fit `budget` bytes."""
    basis = fitted_basis(n, k, budget)
    _refuse_beyond(lanczos_memory(n, k, basis), budget,
                   f"{k} eigenvalues of an operator of {n} entries (a Lanczos basis of {basis})",
                   "raise it, or ask for fewer eigenvalues")
    return basis


def _generator(seed: int, tag: str) -> torch.Generator:
    """A generator for one computation, independent of the order computations run in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(tag.encode())) % 2 ** 63)


def block_eigenvalues(op: BlockOperator, k: int = 5, which: str = "largest", *, tol: float = DEFAULT_TOL,
                      max_steps: int = DEFAULT_STEPS, seed: int = 0, verify: bool = True,
                      group: str = "", basis: int | None = None) -> EigenResult:
    """The k largest or smallest eigenvalues of the operator `op` (see :func:`eigenvalues`), by Lanczos restarted
    with at most `basis` vectors (default :func:`~curvscope.curvature.lanczos.default_basis`)."""
    return _eigenpairs(op, k, which, tol=tol, max_steps=max_steps, seed=seed, verify=verify, group=group,
                       basis=basis)[0]


def _eigenpairs(op: BlockOperator, k: int, which: str, *, tol: float, max_steps: int, seed: int, verify: bool,
                group: str, basis: int | None, deflate: torch.Tensor | None = None) -> tuple[EigenResult, torch.Tensor]:
    """:func:`block_eigenvalues`, with the eigenvectors (k rows, a view of the run's buffer); the first run kept
    orthogonal to the rows of `deflate` (see :func:`~curvscope.curvature.lanczos.extreme_eigenpairs`)."""
    if which not in ("largest", "smallest"):
        raise CurvscopeError(f"which must be 'largest' or 'smallest', not {which!r}.")
    if k < 1 or max_steps < 1:
        raise CurvscopeError(f"k and the number of Lanczos steps must be positive (k={k}, steps={max_steps}).")
    if k > max_steps:
        raise CurvscopeError(f"{k} eigenvalues cannot come from {max_steps} Lanczos steps: allow at least {k} steps.")
    if basis is not None and basis < k + 2:
        raise CurvscopeError(f"a Lanczos basis of {basis} vectors cannot find {k} eigenvalues: allow at least "
                             f"{k + 2} (more memory with --max-memory, or fewer eigenvalues with --top-k).")
    pairs = extreme_eigenpairs(op.matvec, op.dim, k, which == "largest", tol=tol, max_steps=max_steps,
                               generator=_generator(seed, f"{which}:{group}"), device=op.device, verify=verify,
                               basis=basis, deflate=deflate)
    return EigenResult(pairs.values, pairs.residuals, pairs.converged, which, group, op.dim, tol, pairs.steps,
                       pairs.verified, seed), pairs.vectors


def block_trace(op: BlockOperator, matvecs: int = DEFAULT_TRACE_MATVECS, *, seed: int = 0,
                group: str = "") -> TraceResult:
    """tr(C_BB) by Hutch++ with `matvecs` products (exact when the block has at most that many scalars)."""
    value, stderr, exact = hutchpp(op.matvec, op.dim, matvecs, generator=_generator(seed, f"trace:{group}"),
                                   device=op.device)
    return TraceResult(value, stderr, "exact" if exact else "hutch++", min(matvecs, op.dim), group, op.dim, seed)


def block_density(op: BlockOperator, runs: int = 1, steps: int = DEFAULT_STEPS, *, width: float = DEFAULT_WIDTH,
                  seed: int = 0, reorthogonalise: str = SLQ_REORTHOGONALISE) -> DensityResult:
    """The SLQ density of `op` from `runs` Gaussian probes x `steps` Lanczos steps (see :func:`spectral_density`);
    without reorthogonalisation by default (four vectors held: see the module docstring)."""
    if runs < 1 or steps < 1:
        raise CurvscopeError(f"SLQ needs at least one run and one step (runs={runs}, steps={steps}).")
    gen = _generator(seed, "density")
    nodes = np.full((runs, steps), np.nan)
    weights = np.zeros((runs, steps))
    for r in range(runs):
        theta, w = quadrature(op.matvec, random_start(op.dim, gen, op.device), steps, reorthogonalise=reorthogonalise)
        nodes[r, :len(theta)], weights[r, :len(w)] = theta, w
    grid, dens, sigma = gaussian_density(nodes, weights, width=width)
    return DensityResult(grid, dens, nodes, weights, sigma, runs, steps, seed)


Source = nn.Module | CurvatureOperator


@dataclass
class _Reported(BlockOperator):
    """A block operator that reports each product, so that a long Lanczos run shows progress as it goes."""

    report: Callable[[], None] = field(default=lambda: None)

    def matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        product = BlockOperator.matvec(self, v, out)
        self.report()
        return product


def _reported(op: BlockOperator, report: Callable[[], None]) -> _Reported:
    return _Reported(op.curvature, op.indices, op.names, op.dim, report)


def _led(hp: CurvatureOperator, solve: Callable[[], T]) -> T:
    """solve() on rank 0 of a distributed run while the other ranks serve its products, every rank returning its
    result (see curvature/ranks.py); simply solve() in one process."""
    return ranks.lead(solve, hp.block_product, [p.numel() for p in hp.params], hp.device)


@contextmanager
def _operator(source: Source, loss_fn: LossFn | None, batches: Iterable[Batch] | None, curvature: str,
              max_memory: int, device: str | torch.device | None,
              dtype: torch.dtype | None) -> Iterator[CurvatureOperator]:
    """`source` itself when it is an operator (left open for further calls), else a new one, closed after."""
    if isinstance(source, CurvatureOperator):
        yield source
        return
    if loss_fn is None or batches is None:
        raise CurvscopeError("give either a curvature operator, or a model with its loss_fn and batches.")
    with curvature_operator(source, loss_fn, batches, curvature, max_memory=max_memory, device=device,
                            dtype=dtype) as op:
        yield op


def eigenvalues(source: Source, loss_fn: LossFn | None = None, batches: Iterable[Batch] | None = None, k: int = 5,
                which: str = "largest", group: str | None = None, *, curvature: str = DEFAULT_CURVATURE,
                tol: float = DEFAULT_TOL, max_steps: int = DEFAULT_STEPS, seed: int = 0, verify: bool = True,
                max_memory: int = DEFAULT_MAX_MEMORY, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, basis: int | None = None) -> EigenResult:
    """The k largest (or smallest, algebraic) eigenvalues of C (H = ∇²L by default) or of its diagonal block `group`.

    `source` is a model (with `loss_fn` and `batches`, and `curvature` naming C)
    or a :class:`CurvatureOperator` already built (then pass the rest by
    keyword). Lanczos with full reorthogonalisation in float64; stops when every
    wanted Ritz value's residual is below tol·‖C‖ (or after `max_steps`), then
    checks for missed (repeated) eigenvalues with a deflated run. `.values` are
    most extreme first; `.converged` flags each one. The run holds at most
    `basis` float64 vectors of the block's size (a few more, see
    :func:`~curvscope.curvature.lanczos.lanczos_memory`); by default the largest
    basis, up to max(2k + 10, 30), whose vectors fit the operator's max_memory.
    """
    with _operator(source, loss_fn, batches, curvature, max_memory, device, dtype) as op:
        block = op.operator(group)
        size = _basis_within(block.dim, k, op.max_memory) if basis is None else basis
        return _led(op, lambda: block_eigenvalues(block, k, which, tol=tol, max_steps=max_steps, seed=seed,
                                                  verify=verify, group=group or "", basis=size))


def trace(source: Source, loss_fn: LossFn | None = None, batches: Iterable[Batch] | None = None,
          group: str | None = None, *, curvature: str = DEFAULT_CURVATURE, matvecs: int = DEFAULT_TRACE_MATVECS,
          seed: int = 0, max_memory: int = DEFAULT_MAX_MEMORY, device: str | torch.device | None = None,
          dtype: torch.dtype | None = None) -> TraceResult:
    """tr(C) or tr(C_BB) by Hutch++, with `.value` and `.stderr` (`source` as in :func:`eigenvalues`); refused when
    its vectors (:func:`~curvscope.curvature.hutchpp.hutchpp_memory`) do not fit the operator's max_memory."""
    with _operator(source, loss_fn, batches, curvature, max_memory, device, dtype) as op:
        block = op.operator(group)
        _refuse_beyond(hutchpp_memory(block.dim, matvecs), op.max_memory,
                       f"a Hutch++ trace of {matvecs} products of an operator of {block.dim} entries",
                       "raise it, or ask for fewer products")
        return _led(op, lambda: block_trace(block, matvecs, seed=seed, group=group or ""))


def spectral_density(source: Source, loss_fn: LossFn | None = None, batches: Iterable[Batch] | None = None,
                     group: str | None = None, *, curvature: str = DEFAULT_CURVATURE, runs: int = 1,
                     steps: int = DEFAULT_STEPS, width: float = DEFAULT_WIDTH, seed: int = 0,
                     max_memory: int = DEFAULT_MAX_MEMORY, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> DensityResult:
    """The eigenvalue density of C by stochastic Lanczos quadrature (`source` as in :func:`eigenvalues`).

    density(x) = (1/runs) Σ_r Σ_j τ_rj N(x; θ_rj, σ²) with Ritz values θ and
    weights τ (squared first components of T's eigenvectors) of a Lanczos run
    from each Gaussian probe; σ = width x (span of the nodes).
    """
    with _operator(source, loss_fn, batches, curvature, max_memory, device, dtype) as op:
        return _led(op, lambda: block_density(op.operator(group), runs, steps, width=width, seed=seed))


BLOCK_SPECTRA = ("layer", "tensor", "off")


def eigen_blocks(hp: CurvatureOperator, blocks: str) -> list[str]:
    """The blocks whose top eigenvalues `blocks` asks for: every layer ("layer": each module's tensors together,
    and each tensor that is the only one of its module), every tensor and layer ("tensor"), or none ("off")."""
    if blocks not in BLOCK_SPECTRA:
        raise CurvscopeError(f"block spectra must be one of {', '.join(BLOCK_SPECTRA)}, not {blocks!r}.")
    groups = hp.groups()
    if blocks == "off":
        return []
    if blocks == "tensor":
        return list(groups)
    in_layers = {i for name, indices in groups.items() if not _is_tensor(hp, name, indices) for i in indices}
    return [name for name, indices in groups.items()
            if not _is_tensor(hp, name, indices) or indices[0] not in in_layers]


def _is_tensor(hp: CurvatureOperator, name: str, indices: list[int]) -> bool:
    return len(indices) == 1 and name == hp.names[indices[0]]


def deflates(n: int, k: int, basis: int, budget: int) -> bool:
    """Whether :func:`spectrum`'s bottom run keeps the k top eigenvectors out of its Krylov space: when their k
    vectors fit `budget` beside the run's own (:func:`~curvscope.curvature.lanczos.lanczos_memory`), and the
    rest of the space has room for the basis."""
    return n - k >= basis and lanczos_memory(n, k, basis) + 8 * k * n <= budget


def spectrum_memory(n: int, k: int, slq_steps: int, trace_matvecs: int, budget: int) -> tuple[int, int]:
    """The Lanczos basis :func:`spectrum` uses for an operator of n entries, and the bytes of float64 vectors it
    holds at most: the largest of Lanczos's (:func:`~curvscope.curvature.lanczos.lanczos_memory`, with the top
    eigenvectors the bottom run is kept orthogonal to when they fit: :func:`deflates`), SLQ's and Hutch++'s.
    Refused, before any product, when they do not fit `budget` bytes (--max-memory)."""
    basis = fitted_basis(n, k, budget)
    held = max(lanczos_memory(n, k, basis) + (8 * k * n if deflates(n, k, basis, budget) else 0),
               slq_memory(n, slq_steps, SLQ_REORTHOGONALISE), hutchpp_memory(n, trace_matvecs))
    _refuse_beyond(held, budget, f"the spectra of an operator of {n} entries (Lanczos with {basis}, and "
                                 f"Hutch++'s sketch of --trace-matvecs {trace_matvecs})",
                   "raise --max-memory, lower --top-k or --trace-matvecs, or use --no-spectrum", "--max-memory")
    return basis, held


def spectrum(hp: CurvatureOperator, *, k: int = 5, tol: float = DEFAULT_TOL, max_steps: int = DEFAULT_STEPS,
             slq_runs: int = 1, slq_steps: int = DEFAULT_STEPS, trace_matvecs: int = DEFAULT_TRACE_MATVECS,
             seed: int = 0, blocks: str | bool = "layer", max_memory: int | None = None,
             progress: Progress = no_progress) -> SpectrumResult:
    """Top and bottom k eigenvalues, trace and density of C; the trace of every diagonal block and the top k
    eigenvalues of the blocks `blocks` names (see :func:`eigen_blocks`; True: "tensor", False: "off").

    Blocks are every parameter tensor and every layer (module with several tensors), tensors first.
    Every block's trace comes from the products of the whole model's Hutch++ trace (see
    :func:`curvscope.curvature.hutchpp.hutchpp_parts`): tracing the blocks costs no product, and the
    block traces add up to the whole model's. Only the blocks' Lanczos runs grow with their number.

    Memory: the Lanczos runs hold at most `basis` float64 vectors, the largest basis up to the default whose
    vectors fit `max_memory` bytes (the operator's budget when None); SLQ holds four. The progress stage says
    how much before the first product. In a distributed run, rank 0 runs the solvers and every rank multiplies
    its own batches (see curvature/ranks.py); every rank returns the result.
    """
    return _led(hp, lambda: _spectrum(hp, k, tol, max_steps, slq_runs, slq_steps, trace_matvecs, seed, blocks,
                                      max_memory, progress))


def _spectrum(hp: CurvatureOperator, k: int, tol: float, max_steps: int, slq_runs: int, slq_steps: int,
              trace_matvecs: int, seed: int, blocks: str | bool, max_memory: int | None,
              progress: Progress) -> SpectrumResult:
    if isinstance(blocks, bool):
        blocks = "tensor" if blocks else "off"
    start = time.perf_counter()
    groups = hp.groups()
    wanted = set(eigen_blocks(hp, blocks))
    total, done = 4 + len(wanted), 0
    whole = _reported(hp.operator(None), lambda: progress(stage, done, total))
    budget = hp.max_memory if max_memory is None else max_memory
    basis, held = spectrum_memory(whole.dim, k, slq_steps, trace_matvecs, budget)
    stage = f"spectrum (vectors: {format_bytes(held)}, Lanczos basis {basis})"

    def step() -> None:
        nonlocal done
        done += 1
        progress(stage, done, total)

    progress(stage, 0, total)
    top, vectors = _eigenpairs(whole, k, "largest", tol=tol, max_steps=max_steps, seed=seed, verify=True, group="",
                               basis=basis)
    step()
    # the top eigenvectors, copied out of their run's buffer, keep the bottom run to the rest of the spectrum
    deflate = vectors.clone() if deflates(whole.dim, k, basis, budget) and top.converged.all() else None
    del vectors
    bottom = _eigenpairs(whole, k, "smallest", tol=tol, max_steps=max_steps, seed=seed, verify=True, group="",
                         basis=basis, deflate=deflate)[0]
    del deflate
    step()
    shared = hutchpp_parts(whole.matvec, whole.dim, trace_matvecs, [p.numel() for p in hp.params],
                           generator=_generator(seed, "trace:"), device=whole.device)
    tr = TraceResult(shared.value, shared.stderr, "exact" if shared.exact else "hutch++", shared.products, "",
                     whole.dim, seed)
    step()
    density = block_density(whole, slq_runs, slq_steps, seed=seed)
    step()
    out = []
    method = "exact" if shared.exact else "hutch++ (shared products)"
    for name, indices in groups.items():  # tensors first, then layers
        op = _reported(hp.operator(name), lambda: progress(stage, done, total))
        value, stderr = shared.block(indices)
        t = None
        if name in wanted:
            t = block_eigenvalues(op, k, "largest", tol=tol, max_steps=max_steps, seed=seed, group=name,
                                  basis=fitted_basis(op.dim, k, budget))
            step()
        out.append(BlockSpectrum(name, "tensor" if _is_tensor(hp, name, indices) else "layer",
                                 np.asarray(op.names, dtype=str), t,
                                 TraceResult(value, stderr, method, shared.products, name, op.dim, seed)))
    return SpectrumResult(top, bottom, density, tr, out, hp.mode, hp.graph_bytes, hp.count,
                          time.perf_counter() - start, basis, held)
