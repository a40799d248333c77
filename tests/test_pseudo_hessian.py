"""H̄ and ḡ against the dense float64 Hessian, and the identities of docs/DESIGN.md §2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Case, dense, make_case
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope import pseudo_hessian
from curvscope.curvature.partition import make_partition

STRATEGIES = ["triangular", "batched"]


def projector(d, case: Case) -> np.ndarray:
    """P (P x S): column s is U_s, the gradient restricted to tensor s."""
    cols = []
    for sl in d.slices:
        u = torch.zeros_like(d.gradient)
        u[sl] = d.gradient[sl]
        cols.append(u)
    return torch.stack(cols, 1).numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_dense_projection(case: Case, strategy: str) -> None:
    d = dense(case)
    P = projector(d, case)
    res = pseudo_hessian(case.model, case.loss_fn, case.batches([5, 7]), strategy=strategy)
    assert rel(res.pseudo_hessian, P.T @ d.hessian.numpy() @ P) <= 1e-10
    assert rel(res.pseudo_gradient, P.T @ d.gradient.numpy()) <= 1e-12
    assert list(res.names) == [n for n, _ in case.model.named_parameters()]
    assert res.n_samples == 12 and res.n_batches == 2 and res.strategy == strategy


def test_float32_compute_is_close_to_float64() -> None:
    case = make_case("cnn")
    exact = pseudo_hessian(case.model, case.loss_fn, case.batches()).pseudo_hessian
    approx = pseudo_hessian(case.model, case.loss_fn, case.batches(), dtype=torch.float32).pseudo_hessian
    assert approx.dtype == np.float64
    assert 0 < rel(approx, exact) <= 1e-4
    assert next(case.model.parameters()).dtype == torch.float64  # the caller's model is untouched


def test_discrete_partition_is_newton() -> None:
    case = make_case("mlp")
    d = dense(case)
    res = pseudo_hessian(case.model, case.loss_fn, case.batches([4, 8]), "discrete")
    g, h = d.gradient.numpy(), d.hessian.numpy()
    assert res.pseudo_hessian.shape == (len(g), len(g))
    assert rel(res.pseudo_hessian, np.diag(g) @ h @ np.diag(g)) <= 1e-10
    assert rel(res.pseudo_gradient, g ** 2) <= 1e-12
    assert res.names[0] == "0.weight[0,0]"


def test_trivial_partition_is_cauchy() -> None:
    case = make_case("cnn")
    d = dense(case)
    g, h = d.gradient.numpy(), d.hessian.numpy()
    res = pseudo_hessian(case.model, case.loss_fn, case.batches(), "trivial")
    assert res.pseudo_hessian.shape == (1, 1)
    assert res.pseudo_hessian[0, 0] == pytest.approx(g @ h @ g, rel=1e-10)
    assert res.pseudo_gradient[0] == pytest.approx(g @ g, rel=1e-12)


def test_layer_partition_sums_canonical_blocks(case: Case) -> None:
    canon = pseudo_hessian(case.model, case.loss_fn, case.batches())
    layer = pseudo_hessian(case.model, case.loss_fn, case.batches(), "layer")
    part = make_partition(case.model, "layer")
    A = np.zeros((len(canon.names), part.size))
    A[np.arange(len(canon.names)), list(part.assignment)] = 1.0
    assert rel(layer.pseudo_hessian, A.T @ canon.pseudo_hessian @ A) <= 1e-12
    assert rel(layer.pseudo_gradient, A.T @ canon.pseudo_gradient) <= 1e-12
    assert list(layer.names) == list(dict.fromkeys(n.rsplit(".", 1)[0] for n in canon.names))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batching_invariance(strategy: str) -> None:
    case = make_case("cnn", n=17)
    one = pseudo_hessian(case.model, case.loss_fn, case.batches(), strategy=strategy)
    for sizes in ([1, 16], [5, 5, 5, 2], [3] * 5 + [2]):
        cut = pseudo_hessian(case.model, case.loss_fn, case.batches(sizes), strategy=strategy)
        assert rel(cut.pseudo_hessian, one.pseudo_hessian) <= 1e-12
        assert rel(cut.pseudo_gradient, one.pseudo_gradient) <= 1e-12
        assert cut.loss == pytest.approx(one.loss, rel=1e-13)


def test_symmetric(case: Case) -> None:
    for strategy in STRATEGIES:
        h = pseudo_hessian(case.model, case.loss_fn, case.batches([6, 6]), strategy=strategy).pseudo_hessian
        np.testing.assert_array_equal(h, h.T)


def test_row_sums_are_one_hessian_vector_product(case: Case) -> None:
    """Σ_t H̄_st = U_sᵀ (H g)_s, with H g from a single double-backward product."""
    res = pseudo_hessian(case.model, case.loss_fn, case.batches([7, 5]))
    params = list(case.model.parameters())
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernel has no double backward
        loss = case.loss_fn(case.model(case.inputs), case.targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = [x.detach() for x in grads]
        hg = torch.autograd.grad(grads, params, grad_outputs=g)
    expected = np.array([float((gi * hi).sum()) for gi, hi in zip(g, hg)])
    np.testing.assert_allclose(res.pseudo_hessian.sum(1), expected, rtol=1e-10, atol=1e-14)


def test_stderr_across_batches() -> None:
    """sqrt(B/(B-1) Σ_b w_b² (H̄_b - H̄)²) with H̄_b = Uᵀ H_b U, u the full gradient."""
    case = make_case("mlp", n=12)
    sizes = [3, 4, 5]
    batches = case.batches(sizes)
    d = dense(case, batches)
    P = projector(d, case)
    per = np.stack([P.T @ dense(case, [b]).hessian.numpy() @ P for b in batches])
    w = np.array(sizes) / 12
    hbar = np.tensordot(w, per, 1)
    expected = np.sqrt(3 / 2 * np.tensordot(w ** 2, (per - hbar) ** 2, 1))
    res = pseudo_hessian(case.model, case.loss_fn, batches)
    np.testing.assert_allclose(res.pseudo_hessian_stderr, expected, rtol=1e-9, atol=1e-15)
    single = pseudo_hessian(case.model, case.loss_fn, case.batches())
    assert np.isnan(single.pseudo_hessian_stderr).all()


def test_frozen_tensors_are_left_out() -> None:
    case = make_case("mlp")
    case.model[0].bias.requires_grad_(False)
    res = pseudo_hessian(case.model, case.loss_fn, case.batches())
    assert list(res.names) == ["0.weight", "2.weight", "2.bias"]


def test_model_mode_is_restored() -> None:
    case = make_case("mlp")
    case.model.train()
    pseudo_hessian(case.model, case.loss_fn, case.batches())
    assert case.model.training
