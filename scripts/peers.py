"""Thin adapters that time the peer libraries, for scripts/bench.py.

Peers: hessian-eigenthings 1.0.0a5 (`HessianOperator` + `lanczos` / `spectral_density`) and
PyHessian 0.1 (`hessian(...).eigenvalues` / `.density`), on one model and one batch; curvlinops
3.0.1 (`GGNLinearOperator` / `EFLinearOperator` applied to the S columns of U), on a list of
batches. Install them with scripts/install_bench_peers.sh (--no-deps, so torch stays as it is).
`loss_fn` / `criterion` is a batch-mean `(outputs, targets) -> scalar` (here
`torch.nn.functional.nll_loss` on log-softmax outputs; curvlinops gets
`torch.nn.CrossEntropyLoss(reduction="mean")`). Every peer runs on a deep copy of the model in eval mode, so the
caller's model (and its `.grad`) is untouched; only the peer's own computation is timed
(for PyHessian that includes the `hessian(...)` constructor, which does the forward and
the create_graph backward). Peer exceptions come back as a one-line `error`, not raised.

`exact_top_k` / `exact_bottom_k` are the reference: float64 double-backward HVPs on one
kept graph, fed to scipy's ARPACK `eigsh`.
"""
from __future__ import annotations

import copy
import time
import warnings
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


# --------------------------------------------------------------------------- curvlinops

CURVLINOPS_OPERATORS = {"ggn": "GGNLinearOperator", "fisher": "EFLinearOperator"}


def curvlinops_available() -> bool:
    """Whether curvlinops imports (quietly: its dependency linear_operator calls the deprecated torch.jit.script
    on import)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import curvlinops  # noqa: F401
    except ImportError:
        return False
    return True


def load_jvp_decompositions() -> None:
    """Import what `torch.func.jvp` loads on first use (curvlinops' products use it), without the
    DeprecationWarning of its torch.jit.script in torch 2.13, and outside the timed part."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # another PyTorch: it loads what it needs itself
            pass


def curvlinops_pseudo_curvature(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                                curvature: str, seed: int = 0) -> PeerResult:
    """C̄ = U_colsᵀ (C U_cols) by curvlinops, C the GGN (`curvature="ggn"`) or the empirical Fisher ("fisher"),
    U_cols the P x S matrix whose column s is the full-data gradient restricted to parameter tensor s.

    Timed, all of it: the operator's construction (`num_data` given and `check_deterministic=False`, so the
    constructor makes no pass over the data; the check would make four), the gradient pass by the operator's
    own `gradient_and_loss()`, building U_cols densely, `op @ U_cols` (one vmapped pass over the data for
    all S columns) and U_colsᵀ (op @ U_cols), in float64 from the model-dtype product, block by block (row t
    of U_colsᵀ is zero outside tensor t's block). The loss is `torch.nn.CrossEntropyLoss(reduction="mean")`;
    curvlinops weights batch b by n_b/N (N = `num_data`), as curvscope does. `values` is C̄ (S x S, float64).
    """
    import curvlinops

    load_jvp_decompositions()
    net = _fresh(model)
    params = [p for p in net.parameters() if p.requires_grad]
    operator = getattr(curvlinops, CURVLINOPS_OPERATORS[curvature])
    n = sum(len(y) for _, y in batches)

    def run() -> tuple[np.ndarray, str]:
        op = operator(net, torch.nn.CrossEntropyLoss(reduction="mean"), params, batches, num_data=n,
                      check_deterministic=False)
        grad, _loss = op.gradient_and_loss()
        sizes = [p.numel() for p in params]
        offsets = np.cumsum([0, *sizes])
        u_cols = torch.zeros(offsets[-1], len(params), dtype=grad[0].dtype)
        for s, g in enumerate(grad):
            u_cols[offsets[s]:offsets[s + 1], s] = g.reshape(-1)
        cu = op @ u_cols
        cbar = torch.stack([g.reshape(-1).double() @ cu[offsets[t]:offsets[t + 1]].double()
                            for t, g in enumerate(grad)])
        return cbar.numpy(), (f"{CURVLINOPS_OPERATORS[curvature]} @ U_cols ({offsets[-1]} x {len(params)}, "
                              f"{u_cols.dtype}), gradient_and_loss() included")

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


def load_grnewt(src: str) -> None:
    """The author's grnewt (GroupedNewton's src/grnewt folder at `src`) importable as ``grnewt``: its modules
    util.param_struct, hg and nesterov loaded by path, without its __init__, which imports torchvision for data
    loading (torchvision does not import beside torch 2.13.0+cpu)."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    for name, path in (("grnewt", src), ("grnewt.util", str(Path(src) / "util"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
    for name in ("util.param_struct", "nesterov", "hg"):
        full = f"grnewt.{name}"
        if full in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full, Path(src, *name.split(".")).with_suffix(".py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        if name == "util.param_struct":
            sys.modules["grnewt.util"].ParamStructure = module.ParamStructure  # type: ignore[attr-defined]
