"""Data parallelism over torch.distributed: the analysis set's batches are shared among the ranks of a process
group, and every sum over batches becomes a sum over ranks.

When a process group is initialised (by the user's program, or by :func:`join` under ``torchrun``), each rank
holds its own shard of the batches. Every engine weights a batch by n_b/N with N the global number of samples,
sums over its own batches, then over the ranks (:func:`all_sum`): the full gradient, C̄ and its standard error
(:class:`curvscope.curvature.moments.WeightedMoments`), K-FAC's factors, the losses after steps.

Iterative solvers (Lanczos, SLQ, Hutch++) make data-dependent decisions: when to stop, when to restart. So that
every rank takes the same ones, they run on rank 0 alone (:func:`lead`): each curvature-vector product it asks
for is broadcast, every rank multiplies its own batches, and the parts are summed onto rank 0; the other ranks
serve products until rank 0 is done, then receive its result. Their probes and vectors live on rank 0 only.

One process (no process group, or a group of one) runs everything locally; nothing here then communicates.
"""
from __future__ import annotations

import datetime as _dt
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from curvscope.errors import CurvscopeError, summary

T = TypeVar("T")
Product = Callable[[list[int], torch.Tensor], torch.Tensor]

_STOP, _PRODUCT, _FAILED = 0, 1, 2
_role = "spmd"  # "leading" on rank 0 inside lead(), "serving" on the others; "spmd": every rank does the same
_joined = False  # whether join() initialised the process group (then leave() ends it)
_left = False  # whether leave() ended it (then this process must exit without finalising: see left())


def world() -> tuple[int, int]:
    """(rank, number of ranks) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_leader() -> bool:
    """Whether this process prints and writes: rank 0, or the only process."""
    return world()[0] == 0


def global_batch(b: int) -> int:
    """The index in the whole analysis set of this rank's batch b, for shards taken round-robin (:func:`shard`)."""
    rank, size = world()
    return b * size + rank


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's batches: every size-th one from its rank on (all of them in one process). Every rank must get
    at least one."""
    rank, size = world()
    if len(batches) < size:
        raise CurvscopeError(f"the analysis set has {len(batches)} batch{'es' if len(batches) != 1 else ''} for "
                             f"{size} processes: each needs at least one; use more --samples, a smaller "
                             f"--batch-size or fewer processes.")
    return list(batches[rank::size])


def _where(like: torch.device) -> torch.device:
    """Where collectives run: NCCL takes CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(exc: BaseException) -> CurvscopeError:
    rank, size = world()
    return CurvscopeError(f"another process of this distributed run failed or stopped, so rank {rank} of {size} "
                          f"stops too ({summary(exc)}). The error of the process that failed is printed above "
                          f"or in its log; no results file was written or changed.")


def _run(op: Callable[[torch.Tensor], object], t: torch.Tensor) -> torch.Tensor:
    """op(t) on a copy of t where the backend needs it, copied back: `t`."""
    where = _where(t.device)
    buf = t if t.device == where else t.to(where)
    try:
        op(buf)
    except RuntimeError as exc:  # a peer died (connection closed) or timed out
        raise _failed(exc) from None
    if buf is not t:
        t.copy_(buf)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t ← Σ over ranks of t, in place; `t` (untouched in one process)."""
    if world()[1] == 1:
        return t
    return _run(lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM), t)


def all_sum_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Each tensor ← its sum over ranks, in place, in one collective (all float64 on one device)."""
    if world()[1] == 1 or not tensors:
        return
    flat = all_sum(torch.cat([t.reshape(-1) for t in tensors]))
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()


def all_sum_array(a: np.ndarray | Sequence[float]) -> np.ndarray:
    """Σ over ranks of a float64 array (a copy; the array itself in one process)."""
    a = np.asarray(a, dtype=np.float64)
    if world()[1] == 1:
        return a
    return all_sum(torch.from_numpy(a.copy())).numpy()


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    return _run(lambda x: dist.broadcast(x, src=0), t)


def _objects(value: object) -> object:
    """Rank 0's `value` on every rank (pickled between the processes of this run)."""
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:
        raise _failed(exc) from None
    return box[0]


def announce(indices: list[int], v: torch.Tensor, n_params: int) -> None:
    """Before rank 0, leading a solver, multiplies its part: send the block and the vector to the other ranks."""
    if _role != "leading":
        return
    header = torch.zeros(1 + n_params, dtype=torch.int64)
    header[0] = _PRODUCT
    header[1 + torch.as_tensor(indices, dtype=torch.int64)] = 1
    _broadcast(header)
    _broadcast(v.detach().to(torch.float64).contiguous() if v.dtype != torch.float64 else v.contiguous())


def combine(out: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a product's parts: onto rank 0 when it leads a solver (the others serve it), on every
    rank otherwise. `out`, in place."""
    if world()[1] == 1:
        return out
    if _role == "spmd":
        return all_sum(out)
    return _run(lambda x: dist.reduce(x, dst=0, op=dist.ReduceOp.SUM), out)


@contextmanager
def _as(role: str) -> Iterator[None]:
    global _role
    before, _role = _role, role
    try:
        yield
    finally:
        _role = before


def lead(solve: Callable[[], T], product: Product, sizes: Sequence[int], device: torch.device) -> T:
    """solve() on rank 0 while every other rank serves its products (`product(indices, v)`: this rank's part of
    C_BB v for the tensors `indices`, combined by :func:`combine`); every rank returns rank 0's result, or raises
    its error. `sizes`: the number of entries of each parameter tensor. In one process, simply solve()."""
    rank, size = world()
    if size == 1 or _role != "spmd":
        return solve()
    n = len(sizes)
    if rank == 0:
        try:
            with _as("leading"):
                result = solve()
        except CurvscopeError as exc:
            _broadcast(torch.tensor([_FAILED] + [0] * n, dtype=torch.int64))
            _objects(str(exc))
            raise
        _broadcast(torch.tensor([_STOP] + [0] * n, dtype=torch.int64))
        return _objects(result)  # type: ignore[return-value]
    with _as("serving"):
        while True:
            header = _broadcast(torch.zeros(1 + n, dtype=torch.int64))
            if int(header[0]) != _PRODUCT:
                break
            indices = [int(i) for i in torch.nonzero(header[1:]).reshape(-1)]
            v = _broadcast(torch.empty(sum(sizes[i] for i in indices), dtype=torch.float64, device=device))
            product(indices, v)
    if int(header[0]) == _FAILED:
        raise CurvscopeError(str(_objects(None)))
    return _objects(None)  # type: ignore[return-value]


def join(device: str) -> tuple[str, bool]:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment), initialise the default process group from its
    environment, once: gloo on CPU, NCCL for CUDA, where each rank takes the GPU of its LOCAL_RANK. The device
    this rank uses (`device` itself, or cuda:LOCAL_RANK for "cuda"), and whether a group is initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, world()[1] > 1
    if not dist.is_available():
        raise CurvscopeError("this PyTorch build has no torch.distributed, which a torchrun launch needs.")
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        global _joined
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(minutes=30))
            _joined = True
        except (RuntimeError, ValueError) as exc:
            raise CurvscopeError(f"cannot join the distributed run torchrun started ({summary(exc)}): check "
                                 f"--rdzv-endpoint (or MASTER_ADDR/MASTER_PORT) and that every node can reach "
                                 f"it.") from None
    return device, True


def leave() -> None:
    """End the process group :func:`join` started, after a barrier (nothing otherwise)."""
    global _joined, _left
    if _joined and dist.is_initialized():
        _run(lambda x: dist.all_reduce(x), torch.zeros(1))  # every rank is done before the group ends
        dist.destroy_process_group()
        _left = True
    _joined = False


def left() -> bool:
    """Whether :func:`leave` ended a process group in this process.

    Such a process should end with ``os._exit`` once its output is flushed: gloo's C++ threads, even after
    ``destroy_process_group``, can call std::terminate while the interpreter finalises ("terminate called
    without an active exception", SIGABRT), and torchrun then reports the whole run as failed although
    every result was written (measured: 4 of 36 two-process runs of the command line on a loaded 2-core
    machine)."""
    return _left
