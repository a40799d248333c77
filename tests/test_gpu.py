"""The CUDA paths against the CPU, run whenever a GPU is present (skipped otherwise): every curvature's C̄ and
products, the spectra with their Lanczos vectors on the device, K-FAC, and the strategy `auto` picks there."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_case

from curvscope import curvature_operator, eigenvalues, kfac, pseudo_hessian, trace
from curvscope.curvature.operator import full_gradient
from curvscope.curvature.partition import make_partition
from curvscope.sources.losses import build_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_pseudo_curvature_on_the_gpu_equals_the_cpu(curvature: str) -> None:
    case = make_case("cnn", n=24)
    batches = case.batches([10, 8, 6])
    cpu = pseudo_hessian(case.model, case.loss_fn, batches, curvature=curvature)
    gpu = pseudo_hessian(case.model, case.loss_fn, batches, curvature=curvature, device="cuda")
    assert _rel(gpu.pseudo_hessian, cpu.pseudo_hessian) <= 1e-10
    assert _rel(gpu.pseudo_hessian_stderr, cpu.pseudo_hessian_stderr) <= 1e-8
    assert gpu.strategy in ("triangular", "batched", "forward-mode", "double-vjp")


def test_spectra_on_the_gpu_equal_the_cpu() -> None:
    case = make_case("layernorm", n=20)
    batches = case.batches([12, 8])
    cpu = eigenvalues(case.model, case.loss_fn, batches, k=3)
    with curvature_operator(case.model, case.loss_fn, batches, device="cuda") as op:
        assert op.device.type == "cuda"
        gpu = eigenvalues(op, k=3)
        tr_gpu = trace(op, matvecs=9)
    assert _rel(gpu.values, cpu.values) <= 1e-10
    assert np.isfinite(tr_gpu.value)


def test_kfac_on_the_gpu_equals_the_cpu() -> None:
    case = make_case("cnn", n=16)
    loss = build_loss("nll")
    batches = case.batches([9, 7])
    out = []
    for device in ("cpu", "cuda"):
        with curvature_operator(case.model, loss, batches, "ggn", device=device) as op:
            part = make_partition(op.obj.model)
            u, value = full_gradient(op.obj, op.params)
            gbar = op.projection(part, gradient=(u, value))
            out.append(kfac(op).projection(part, u, gbar.pseudo_hessian)[0])
    assert _rel(out[1], out[0]) <= 1e-10
