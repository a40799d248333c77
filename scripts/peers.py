"""Thin adapters that time the peer libraries on one model and one batch, for scripts/bench.py.

Peers: hessian-eigenthings 1.0.0a5 (`HessianOperator` + `lanczos` / `spectral_density`) and
PyHessian 0.1 (`hessian(...).eigenvalues` / `.density`). `loss_fn` / `criterion` is a
batch-mean `(outputs, targets) -> scalar` (here `torch.nn.functional.nll_loss` on
log-softmax outputs). Every peer runs on a deep copy of the model in eval mode, so the
caller's model (and its `.grad`) is untouched; only the peer's own computation is timed
(for PyHessian that includes the `hessian(...)` constructor, which does the forward and
the create_graph backward). Peer exceptions come back as a one-line `error`, not raised.

`exact_top_k` / `exact_bottom_k` are the reference: float64 double-backward HVPs on one
kept graph, fed to scipy's ARPACK `eigsh`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PeerResult:
    """One timed peer run: the values it returned (or None), wall seconds, a one-line error or None, a note."""

    values: np.ndarray | None
    seconds: float
    error: str | None
    note: str


def _fresh(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy in eval mode with no `.grad`, optionally cast to `dtype`."""
    clone = copy.deepcopy(model).eval()
    if dtype is not None:
        clone = clone.to(dtype)
    _drop_grads(clone)
    return clone


def _drop_grads(model: torch.nn.Module) -> None:
    """Set every `.grad` to None. PyHessian's `backward(create_graph=True)` leaves each parameter's
    `.grad` holding its graph, a parameter <-> grad reference cycle through C++ that Python's
    garbage collector cannot free: without this, every PyHessian run would leak its model copy
    and graph for the rest of the benchmark."""
    for p in model.parameters():
        p.grad = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _timed(fn: Callable[[], tuple[np.ndarray | None, str]], seed: int, net: torch.nn.Module) -> PeerResult:
    """Run `fn` on the peer's copy `net` under a forked, seeded torch RNG; time it; turn an exception
    into `error`; then, untimed, drop `net`'s grads (see `_drop_grads`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = time.perf_counter()
        try:
            (values, note), error = fn(), None
        except Exception as exc:  # noqa: BLE001 - peers fail in many ways; report, don't raise
            values, note, error = None, "failed", _one_line(exc)
        seconds = time.perf_counter() - start
    _drop_grads(net)
    return PeerResult(values, seconds, error, note)


def _descending(values: torch.Tensor | list[float]) -> np.ndarray:
    return np.sort(np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64))[::-1].copy()


# --------------------------------------------------------------------------- hessian-eigenthings


def _eigenthings_operator(model: torch.nn.Module, loss_fn: Criterion, inputs: torch.Tensor,
                          targets: torch.Tensor):
    from hessian_eigenthings import HessianOperator, supervised_loss

    # Defaults: method="autograd" (forward + double backward rebuilt on every matvec),
    # full_dataset=True over a one-batch "dataloader".
    return HessianOperator(model, [(inputs, targets)], supervised_loss(loss_fn))


def eigenthings_top_k(model: torch.nn.Module, loss_fn: Criterion, inputs: torch.Tensor,
                      targets: torch.Tensor, k: int = 5, steps: int = 40, seed: int = 0) -> PeerResult:
    """Top-k Hessian eigenvalues by hessian-eigenthings' Lanczos, exactly `steps` steps, descending.

    `lanczos(H, k=k, max_iter=steps, which="LA", seed=seed)`; other arguments at their
    defaults (tol=1e-4 only sets the `converged` flags; reorthogonalize=None -> full
    reorthogonalisation when steps <= 50). Runs in the model's dtype.
    """
    from hessian_eigenthings import lanczos

    net = _fresh(model)

    def run() -> tuple[np.ndarray, str]:
        op = _eigenthings_operator(net, loss_fn, inputs, targets)
        res = lanczos(op, k=k, max_iter=steps, which="LA", seed=seed)
        conv = int(res.converged.sum())
        return _descending(res.eigenvalues), (
            f"lanczos(k={k}, max_iter={steps}, which='LA', tol=1e-4): {res.iterations} steps, "
            f"{conv}/{k} Ritz pairs flagged converged, dtype {op.dtype}")

    return _timed(run, seed, net)


def eigenthings_density(model: torch.nn.Module, loss_fn: Criterion, inputs: torch.Tensor,
                        targets: torch.Tensor, runs: int = 1, steps: int = 100, seed: int = 0) -> PeerResult:
    """SLQ spectral density by hessian-eigenthings: `runs` Rademacher probes x `steps` Lanczos steps.

    `spectral_density(H, num_runs=runs, lanczos_steps=steps, seed=seed)` (always fully
    reorthogonalised; grid of 10000 points, sigma = spread / steps). `values` are the
    quadrature nodes of all runs, descending.
    """
    from hessian_eigenthings import spectral_density

    net = _fresh(model)

    def run() -> tuple[np.ndarray, str]:
        op = _eigenthings_operator(net, loss_fn, inputs, targets)
        res = spectral_density(op, num_runs=runs, lanczos_steps=steps, seed=seed)
        nodes = res.raw_eigenvalues.reshape(-1)
        nodes = nodes[~torch.isnan(nodes)]
        return _descending(nodes), (
            f"spectral_density(num_runs={runs}, lanczos_steps={steps}): values = {nodes.numel()} "
            f"SLQ nodes (weights and a {res.grid.numel()}-point smoothed density, sigma={res.sigma:.3g}, "
            f"also returned), dtype {op.dtype}")

    return _timed(run, seed, net)


# --------------------------------------------------------------------------- PyHessian


def pyhessian_top_k(model: torch.nn.Module, criterion: Criterion, inputs: torch.Tensor,
                    targets: torch.Tensor, k: int = 5, seed: int = 0) -> PeerResult:
    """Top-k by PyHessian's deflated power iteration, descending.

    `hessian(model, criterion, data=(inputs, targets), cuda=False).eigenvalues(top_n=k)`
    with its defaults maxIter=100 (per eigenvalue) and tol=1e-3 (relative change of the
    Rayleigh quotient between iterations). Runs in the model's dtype.
    """
    from pyhessian import hessian

    net = _fresh(model)

    def run() -> tuple[np.ndarray, str]:
        h = hessian(net, criterion, data=(inputs, targets), cuda=False)
        values, _ = h.eigenvalues(top_n=k)
        return _descending(values), f"eigenvalues(maxIter=100, tol=1e-3, top_n={k}): power iteration"

    return _timed(run, seed, net)


def pyhessian_density(model: torch.nn.Module, criterion: Criterion, inputs: torch.Tensor,
                      targets: torch.Tensor, runs: int = 1, steps: int = 100, seed: int = 0) -> PeerResult:
    """SLQ density by PyHessian: `hessian(...).density(iter=steps, n_v=runs)`; `values` are the nodes, descending."""
    from pyhessian import hessian

    net = _fresh(model)

    def run() -> tuple[np.ndarray, str]:
        h = hessian(net, criterion, data=(inputs, targets), cuda=False)
        nodes, _weights = h.density(iter=steps, n_v=runs)
        flat = np.concatenate([np.asarray(n, dtype=np.float64) for n in nodes])
        return _descending(flat), f"density(iter={steps}, n_v={runs}): values = {flat.size} SLQ nodes"

    return _timed(run, seed, net)


# --------------------------------------------------------------------------- reference


def _exact_extreme(model: torch.nn.Module, loss_fn: Criterion, inputs: torch.Tensor,
                   targets: torch.Tensor, k: int, tol: float, which: str,
                   dtype: torch.dtype = torch.float64) -> np.ndarray:
    """`eigsh(which=which)` on the Hessian in `dtype`; HVPs by double backward on one kept graph."""
    net = _fresh(model, dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    x = inputs.to(dtype) if inputs.is_floating_point() else inputs
    loss = loss_fn(net(x), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sizes = [p.numel() for p in params]
    n = sum(sizes)

    def matvec(v: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(dtype)
        parts = [c.view_as(p) for c, p in zip(torch.split(flat, sizes), params)]
        hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach().to(torch.float64).numpy()

    op = LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=np.float64)
    values = eigsh(op, k=k, which=which, tol=tol, ncv=min(n - 1, max(2 * k + 1, 40)), return_eigenvectors=False)
    return np.sort(values)


def exact_top_k(model: torch.nn.Module, loss_fn: Criterion, inputs: torch.Tensor,
                targets: torch.Tensor, k: int = 5, tol: float = 1e-8,
                dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Reference k largest Hessian eigenvalues (products in `dtype`, ARPACK which="LA"), descending."""
    return _exact_extreme(model, loss_fn, inputs, targets, k, tol, "LA", dtype)[::-1].copy()


def exact_bottom_k(model: torch.nn.Module, loss_fn: Criterion, inputs: torch.Tensor,
                   targets: torch.Tensor, k: int = 5, tol: float = 1e-8) -> np.ndarray:
    """Reference k smallest Hessian eigenvalues (float64, ARPACK which="SA"), ascending."""
    return _exact_extreme(model, loss_fn, inputs, targets, k, tol, "SA")
