"""Streamed weighted moments (curvature/moments.py) against the stacked formula, and the projection's memory
that does not grow with the number of batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from curvscope.curvature.moments import WeightedMoments


def stacked(weights: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.tensordot(weights, xs, axes=1)
    B = len(weights)
    return mean, np.sqrt(B / (B - 1) * np.tensordot(weights ** 2, (xs - mean) ** 2, axes=1))


@pytest.mark.parametrize("B", [2, 3, 17, 200])
def test_streamed_equals_stacked(B: int) -> None:
    rng = np.random.default_rng(B)
    sizes = rng.integers(1, 40, B)
    w = sizes / sizes.sum()
    xs = rng.normal(size=(B, 5, 5))
    m = WeightedMoments()
    for wb, x in zip(w, xs):
        m.add(float(wb), x)
    mean, err = stacked(w, xs)
    assert m.count == B
    np.testing.assert_allclose(m.mean, mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m.stderr, err, rtol=1e-11)


def test_no_cancellation_when_the_spread_is_tiny() -> None:
    """A spread 1e-9 of a mean 1e3: the unshifted Σw²x² − mean²Σw² would lose every digit; the shift keeps ~6."""
    rng = np.random.default_rng(0)
    B = 64
    w = np.full(B, 1 / B)
    xs = 1e3 + 1e-9 * rng.normal(size=(B, 3))
    m = WeightedMoments()
    for wb, x in zip(w, xs):
        m.add(float(wb), x)
    np.testing.assert_allclose(m.stderr, stacked(w, xs)[1], rtol=1e-5)


def test_one_batch_has_no_stderr() -> None:
    m = WeightedMoments()
    m.add(1.0, np.ones((2, 2)))
    assert np.isnan(m.stderr).all() and (m.mean == 1).all()


def test_identical_batches_have_zero_stderr() -> None:
    m = WeightedMoments()
    for _ in range(4):
        m.add(0.25, np.full((3, 3), 0.1))
    assert (m.stderr == 0).all()


PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from curvscope.curvature.hessian import HessianOperator
    from curvscope.curvature.partition import make_partition
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(150)])  # S = 300 tensors
    B = int(sys.argv[1])
    batches = [(torch.randn(1, 1), torch.randn(1, 1)) for _ in range(B)]
    # each batch's projection is a fresh S x S float64 matrix (720 KiB): only their accumulation is measured
    HessianOperator.batch_projection = lambda self, b, u, u64, part, method=None: torch.full(
        (part.size, part.size), float(b), dtype=torch.float64)
    with HessianOperator.create(model, nn.functional.mse_loss, batches) as op:
        part = make_partition(model, "canonical")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = op.projection(part)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": after - before, "batches": res.n_batches, "S": len(res.names),
                      "mean": float(res.pseudo_hessian[0, 0])}))
""")


def _growth(batches: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PEAK, str(batches)], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_projection_memory_is_flat_in_the_number_of_batches() -> None:
    """600 batches of an S = 300 projection would stack 600 x 300² float64 = 412 MiB; streamed, the peak grows
    by less than 40 MiB from 20 batches to 600."""
    small, large = _growth(20), _growth(600)
    assert small["S"] == large["S"] == 300 and large["batches"] == 600
    assert large["mean"] == pytest.approx(599 / 2)  # the batches were all taken in, with equal weights
    assert large["growth_kib"] - small["growth_kib"] < 40 * 1024, (small, large)
