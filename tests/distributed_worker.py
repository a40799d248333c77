"""One process of the distributed tests (tests/test_distributed.py), run alone or by torchrun: the Python API on
this rank's shard of a fixed analysis set, everything rank-independent saved to OUT/rank<r>.npz.

    python tests/distributed_worker.py OUT                                  # one process: the reference
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from conftest import make_case

from curvscope import curvature_operator, kfac
from curvscope.curvature.operator import full_gradient
from curvscope.curvature.partition import make_partition
from curvscope.curvature.ranks import join, leave, shard, world
from curvscope.curvature.spectrum import spectrum
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.sources.losses import build_loss

#: 33 samples in batches of 5: 7 batches, the last of 3, so 2 ranks get 4 and 3 batches of unequal sizes
SIZES = [5] * 6 + [3]


def main(out: Path) -> None:
    join("cpu")
    try:
        compute(out)
    finally:
        leave()  # a process group left alive at exit can abort it ("terminate called without an active exception")


def compute(out: Path) -> None:
    torch.set_num_threads(1)
    case = make_case("cnn", n=sum(SIZES))
    case.loss_fn = build_loss("nll")  # built in, so that Monte-Carlo K-FAC can sample its labels
    mine = shard(case.batches(SIZES))
    part = make_partition(case.model, "canonical")
    found: dict[str, np.ndarray] = {"batches": np.asarray([len(mine)])}
    with curvature_operator(case.model, case.loss_fn, mine, "hessian") as op:
        g, loss = full_gradient(op.obj, op.params)
        res = op.projection(part, gradient=(g, loss))
        found["order3"], found["order3_stderr"] = op.order3(part, (g, loss))
        spec = spectrum(op, k=3, blocks="layer", slq_steps=20, trace_matvecs=9)
    found.update(gradient=torch.cat([t.reshape(-1) for t in g]).numpy(), loss=np.asarray([loss]),
                 hbar=res.pseudo_hessian, stderr=res.pseudo_hessian_stderr, n=np.asarray([res.n_samples,
                                                                                            res.n_batches]),
                 top=spec.top.values, bottom=spec.bottom.values, trace=np.asarray([spec.trace.value,
                                                                                   spec.trace.stderr]),
                 nodes=spec.density.nodes, blocks=np.asarray([b.top.values for b in spec.blocks if b.top is not None]),
                 block_traces=np.asarray([b.trace.value for b in spec.blocks]))
    with curvature_operator(case.model, case.loss_fn, mine, "ggn") as op:
        gbar = op.projection(part, gradient=(g, loss))
        for flavour in ("type-2", "mc"):
            factors = kfac(op, flavour, mc_samples=2, seed=3)
            found[f"kbar_{flavour}"] = factors.projection(part, g, gbar.pseudo_hessian)[0]
        found["gbar"] = gbar.pseudo_hessian
    _, after = loss_after_steps(case.model, case.loss_fn, mine, part, [np.full(part.size, 0.1), -res.pseudo_gradient],
                                gradient=(g, loss))
    found["after"] = after
    np.savez(out / f"rank{world()[0]}.npz", **found)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
