"""Lanczos, SLQ and Hutch++ against the dense float64 Hessian of small models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Case, dense, make_case

from curvscope import eigenvalues, spectral_density, trace
from curvscope.cli.types import parse_memory
from curvscope.curvature.hessian import HessianOperator
from curvscope.curvature.lanczos import extreme_eigenpairs
from curvscope.curvature.spectrum import block_eigenvalues, block_trace
from curvscope.errors import CurvscopeError


def exact_spectrum(case: Case, sl: slice | None = None) -> np.ndarray:
    h = dense(case, case.batches([5, 7])).hessian.numpy()
    if sl is not None:
        h = h[sl, sl]
    return np.linalg.eigvalsh(h)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_extreme_eigenvalues_match_dense(case: Case, which: str) -> None:
    lam = exact_spectrum(case)
    res = eigenvalues(case.model, case.loss_fn, case.batches([5, 7]), k=4, which=which, tol=1e-10, max_steps=300)
    expected = lam[::-1][:4] if which == "largest" else lam[:4]
    np.testing.assert_allclose(res.values, expected, rtol=1e-8, atol=1e-12 * np.abs(lam).max())
    assert res.converged.all() and res.verified and res.which == which and res.dim == len(lam)
    assert np.all(res.residuals <= 1e-10 * np.abs(lam).max())


def test_block_eigenvalues_equal_the_dense_block() -> None:
    case = make_case("cnn")
    d = dense(case, case.batches([5, 7]))
    h = d.hessian.numpy()
    with HessianOperator.create(case.model, case.loss_fn, case.batches([5, 7])) as hp:
        for group, sl in (("conv.weight", d.slices[0]), ("fc", slice(d.slices[2].start, d.slices[3].stop))):
            res = block_eigenvalues(hp.operator(group), 3, "largest", tol=1e-10, max_steps=300, group=group)
            np.testing.assert_allclose(res.values, np.linalg.eigvalsh(h[sl, sl])[::-1][:3], rtol=1e-8)
            assert res.converged.all() and res.group == group
        with pytest.raises(CurvscopeError, match="no parameter tensor or layer is called 'fc2'"):
            hp.operator("fc2")


def test_cached_and_streamed_products_agree() -> None:
    case = make_case("layernorm")
    v = torch.randn(sum(p.numel() for p in case.model.parameters()), dtype=torch.float64)
    with HessianOperator.create(case.model, case.loss_fn, case.batches([5, 7])) as cached:
        a = cached.operator()(v)
        assert cached.mode == "cached" and cached.graph_bytes > 0
    with HessianOperator.create(case.model, case.loss_fn, case.batches([5, 7]), max_memory=0) as streamed:
        b = streamed.operator()(v)
        assert streamed.mode == "streamed"
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    d = dense(case, case.batches([5, 7]))
    torch.testing.assert_close(a, d.hessian @ v, rtol=1e-10, atol=1e-12)


def test_slq_density_integrates_to_one_and_matches_moments() -> None:
    """E[vᵀH^j v/‖v‖²] = tr(H^j)/P for a Gaussian v; checked within 4 standard errors over 200 probes."""
    case = make_case("mlp")
    lam = exact_spectrum(case)
    P = len(lam)
    res = spectral_density(case.model, case.loss_fn, case.batches([5, 7]), runs=200, steps=P, seed=3)
    np.testing.assert_allclose(res.weights.sum(1), 1.0, rtol=1e-12)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-6)
    for j in (1, 2):
        per_run = np.nansum(res.weights * np.nan_to_num(res.nodes) ** j, axis=1)
        exact = np.mean(lam ** j)
        assert abs(per_run.mean() - exact) <= 4 * per_run.std(ddof=1) / np.sqrt(len(per_run)), j
    mean = np.trapezoid(res.grid * res.density, res.grid)
    assert mean == pytest.approx(np.nansum(res.weights * np.nan_to_num(res.nodes)) / 200, rel=1e-6)


def test_hutchpp_within_three_standard_errors() -> None:
    case = make_case("cnn")
    exact = float(np.trace(dense(case, case.batches([5, 7])).hessian.numpy()))
    z = []
    for seed in range(8):
        res = trace(case.model, case.loss_fn, case.batches([5, 7]), matvecs=30, seed=seed)
        assert not res.exact and res.stderr > 0
        z.append((res.value - exact) / res.stderr)
    assert np.all(np.abs(z) <= 3), z
    assert len(set(np.round(z, 6))) == 8  # the seeds really change the probes


def test_trace_is_exact_for_small_blocks() -> None:
    case = make_case("cnn")
    d = dense(case, case.batches([5, 7]))
    with HessianOperator.create(case.model, case.loss_fn, case.batches([5, 7])) as hp:
        res = block_trace(hp.operator("fc.bias"), 30, group="fc.bias")
    sl = d.slices[3]
    assert res.exact and res.stderr == 0
    assert res.value == pytest.approx(float(np.trace(d.hessian.numpy()[sl, sl])), rel=1e-12)


def _diag_operator(lam: np.ndarray, seed: int = 0):
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    a = q @ torch.diag(torch.as_tensor(lam)) @ q.T
    return lambda v, out=None: torch.mv(a, v, out=out)


@pytest.mark.parametrize("top", [
    [10.0, 10.0, 10.0, 9.0],  # exactly repeated: one Krylov space sees a single copy
    [10.0, 10.0 - 1e-9, 10.0 - 2e-9, 9.0],  # clustered within 1e-10 relative
    [10.0, 9.99, 9.98, 9.97],  # clustered within 1e-3
])
def test_clustered_top_eigenvalues_are_resolved_or_flagged(top: list[float]) -> None:
    rng = np.random.default_rng(0)
    lam = np.concatenate([top, rng.uniform(-1, 8.5, 196)])
    truth = np.sort(lam)[::-1][:5]
    for steps in (15, 40, 200):
        res = extreme_eigenpairs(_diag_operator(lam), len(lam), 5, True, tol=1e-9, max_steps=steps,
                                 generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
        ok = np.abs(res.values - truth) <= 1e-8 * 10
        assert np.all(ok[res.converged]), (steps, res.values, truth, res.converged)
    assert res.converged.all()  # with enough steps every value is found


def test_residuals_from_the_lanczos_relation_equal_measured_ones() -> None:
    """The residuals, read off the recorded relation, equal ‖Hx − θx‖ computed with an extra product."""
    rng = np.random.default_rng(2)
    lam = np.concatenate([[5.0, 5.0, 4.0], rng.uniform(-3, 3, 97)])  # a repeat: the check run adds a vector
    op = _diag_operator(lam, seed=3)
    for steps in (12, 100):
        res = extreme_eigenpairs(op, len(lam), 4, True, tol=1e-9, max_steps=steps,
                                 generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        measured = [float(torch.linalg.vector_norm(op(x) - v * x)) for v, x in zip(res.values, res.vectors)]
        np.testing.assert_allclose(res.residuals, measured, rtol=1e-6, atol=1e-13 * np.abs(lam).max())
    assert res.converged.all() and res.values[1] == pytest.approx(5.0, rel=1e-12)


def test_memory_sizes() -> None:
    assert parse_memory("2G") == 2 * 1024 ** 3 and parse_memory("512MiB") == 512 * 1024 ** 2
    assert parse_memory("1000") == 1000 and parse_memory("1.5k") == 1536
    for bad in ("lots", "0", "nanG", "1e30T"):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory(bad)


def test_spectral_functions_share_one_operator() -> None:
    """eigenvalues, trace and spectral_density accept a built operator; its graphs are built once and reused."""
    from curvscope import curvature_operator, eigenvalues, spectral_density, trace

    case = make_case("mlp")
    batches = case.batches([5, 7])
    h = dense(case, batches).hessian.numpy()
    with curvature_operator(case.model, case.loss_fn, batches) as op:
        top = eigenvalues(op, k=2, tol=1e-10, max_steps=200)
        graphs = op._graphs[0][0]
        tr = trace(op, matvecs=200)
        dens = spectral_density(op, steps=10)
        assert op._graphs[0][0] is graphs and op.count > 0  # the same kept graph served every call
    np.testing.assert_allclose(top.values, np.linalg.eigvalsh(h)[::-1][:2], rtol=1e-8)
    assert tr.value == pytest.approx(np.trace(h), rel=1e-10) and dens.nodes.shape == (1, 10)
    assert eigenvalues(case.model, case.loss_fn, batches, k=1).values[0] == pytest.approx(np.linalg.eigvalsh(h)[-1],
                                                                                        rel=1e-6)
    with pytest.raises(CurvscopeError, match="operator, or a model"):
        trace(case.model)


def test_eigenvalues_fit_their_basis_to_the_memory_budget() -> None:
    """Without `basis`, eigenvalues() takes the largest basis whose vectors fit the operator's max_memory (the run
    is then the one an explicit basis gives), and refuses when even k + 2 vectors do not fit."""
    from curvscope import curvature_operator
    from curvscope.curvature.lanczos import lanczos_memory

    case = make_case("mlp")
    batches = case.batches([5, 7])
    lam = exact_spectrum(case)
    n, k = len(lam), 4
    runs = {}
    for basis in (7, 30):
        with curvature_operator(case.model, case.loss_fn, batches, max_memory=lanczos_memory(n, k, basis)) as op:
            fitted = eigenvalues(op, k=k, tol=1e-10, max_steps=300)
            runs[basis] = eigenvalues(op, k=k, tol=1e-10, max_steps=300, basis=basis)
        assert fitted.steps == runs[basis].steps
        np.testing.assert_array_equal(fitted.values, runs[basis].values)
        np.testing.assert_allclose(fitted.values, lam[::-1][:k], rtol=1e-8)
    assert runs[7].steps != runs[30].steps  # the budget chose the basis
    with curvature_operator(case.model, case.loss_fn, batches, max_memory=lanczos_memory(n, k, k + 2) - 1) as op:
        with pytest.raises(CurvscopeError, match="Lanczos basis of 6.*raise it"):
            eigenvalues(op, k=k)


def test_traces_refuse_what_does_not_fit_the_memory_budget() -> None:
    """Hutch++ holds s + 4 vectors (s = matvecs // 3), or the n unit vectors of an exact trace; trace() checks
    them against the operator's max_memory before any product, as eigenvalues() does its basis."""
    from curvscope import curvature_operator
    from curvscope.curvature.hutchpp import hutchpp_memory

    assert hutchpp_memory(10 ** 6, 30) == 8 * 10 ** 6 * 14 and hutchpp_memory(10 ** 6, 5) == 8 * 10 ** 6 * 6
    assert hutchpp_memory(20, 30) == 8 * 20 * 21
    case = make_case("mlp")
    batches = case.batches([5, 7])
    n = sum(p.numel() for p in case.model.parameters())
    with curvature_operator(case.model, case.loss_fn, batches, max_memory=hutchpp_memory(n, 9)) as op:
        assert trace(op, matvecs=9).matvecs == 9 and op.count == 9
    with curvature_operator(case.model, case.loss_fn, batches, max_memory=hutchpp_memory(n, 9) - 1) as op:
        with pytest.raises(CurvscopeError, match="Hutch\\+\\+ trace of 9 products.*raise it, or ask for fewer"):
            trace(op, matvecs=9)
        assert op.count == 0  # refused before any product


def test_spectrum_deflates_the_bottom_run_when_the_top_vectors_fit() -> None:
    """spectrum()'s bottom run is kept orthogonal to the top eigenvectors when their k vectors fit the budget
    beside its own (deflates); its values agree with the dense reference either way, and under a budget with no
    room for them it is exactly the plain run (block_eigenvalues)."""
    from curvscope import curvature_operator
    from curvscope.curvature.lanczos import default_basis, lanczos_memory
    from curvscope.curvature.spectrum import deflates, spectrum, spectrum_memory

    case = make_case("cnn")
    batches = case.batches([5, 7])
    lam = exact_spectrum(case)
    n, k = len(lam), 3
    basis = default_basis(k)
    tight = lanczos_memory(n, k, basis) + 8 * k * n - 1
    assert not deflates(n, k, basis, tight) and deflates(n, k, basis, tight + 1)
    assert spectrum_memory(n, k, 10, 9, tight + 1)[1] == lanczos_memory(n, k, basis) + 8 * k * n
    results = {}
    for budget in (tight, tight + 1):
        with curvature_operator(case.model, case.loss_fn, batches, max_memory=budget) as op:
            results[budget] = spectrum(op, k=k, tol=1e-10, max_steps=300, slq_steps=10, trace_matvecs=9,
                                       blocks="off")
            plain = block_eigenvalues(op.operator(None), k, "smallest", tol=1e-10, max_steps=300, basis=basis)
        np.testing.assert_allclose(results[budget].bottom.values, lam[:k], rtol=1e-8,
                                   atol=1e-10 * np.abs(lam).max())
        assert results[budget].bottom.converged.all()
    np.testing.assert_array_equal(results[tight].bottom.values, plain.values)
    assert results[tight].bottom.steps == plain.steps != results[tight + 1].bottom.steps
