"""Thick-restart Lanczos (bounded basis) and SLQ without reorthogonalisation, against dense float64 references."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from curvscope.curvature import lanczos as lz
from curvscope.curvature.lanczos import (
    CHUNK,
    default_basis,
    default_products,
    extreme_eigenpairs,
    lanczos_memory,
    quadrature,
    slq_memory,
)
from curvscope.measures.density import gaussian_density

CPU = torch.device("cpu")


def dense_operator(lam: np.ndarray, seed: int = 0):
    """v ↦ Q diag(λ) Qᵀ v for a seeded random orthogonal Q."""
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    a = q @ torch.diag(torch.as_tensor(lam, dtype=torch.float64)) @ q.T
    return lambda v, out=None: torch.mv(a, v, out=out)


def diagonal_operator(lam: np.ndarray):
    d = torch.as_tensor(lam, dtype=torch.float64)
    return lambda v, out=None: torch.mul(d, v, out=out)


def spectrum(name: str, n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(7)
    if name == "repeated":  # multiplicity 3 at both ends
        return np.concatenate([[10.0] * 3, [9.5], [-4.0] * 3, [-3.5], rng.uniform(-3, 9, n - 8)])
    if name == "clustered":  # within 1e-10 relative at both ends
        return np.concatenate([10 - 1e-9 * np.arange(3), [9.5], -4 + 1e-9 * np.arange(3), [-3.5],
                               rng.uniform(-3, 9, n - 8)])
    if name == "indefinite":
        return rng.standard_normal(n) ** 3
    if name == "wide":  # magnitudes from 1e-6 to 1e3, twenty negative ones from -0.1 to -100
        return np.concatenate([10 ** rng.uniform(-6, 3, n - 20), -np.geomspace(0.1, 100, 20)])
    raise ValueError(name)


def run(op, n: int, k: int, largest: bool, **kw):
    kw.setdefault("tol", 1e-9)
    kw.setdefault("max_steps", 80)
    return extreme_eigenpairs(op, n, k, largest, generator=torch.Generator().manual_seed(1), device=CPU, **kw)


@pytest.mark.parametrize("name", ["repeated", "clustered", "indefinite", "wide"])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k, basis", [(3, None), (5, 10), (10, 15)])
def test_restarted_lanczos_matches_eigvalsh(name: str, largest: bool, k: int, basis: int | None) -> None:
    lam = spectrum(name)
    op = dense_operator(lam)
    res = run(op, len(lam), k, largest, basis=basis, max_products=4000)
    exact = np.sort(lam)[::-1][:k] if largest else np.sort(lam)[:k]
    scale = np.abs(lam).max()
    np.testing.assert_allclose(res.values, exact, rtol=0, atol=1e-8 * scale)
    assert res.converged.all() and res.verified
    assert np.all(res.residuals <= 1e-9 * scale * (1 + 1e-12))
    b = default_basis(k) if basis is None else basis
    if name != "indefinite":
        assert res.steps > b  # these need more products than the basis holds: restarts happened
    x = res.vectors
    assert x.shape == (k, len(lam))
    torch.testing.assert_close(x @ x.T, torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("products", [15, 40, 400])
def test_residuals_from_the_relation_survive_restarts(products: int) -> None:
    """After restarts (and a check run adding a missed copy), the recorded residuals equal ‖Hx − θx‖."""
    rng = np.random.default_rng(2)
    lam = np.concatenate([[5.0, 5.0, 4.0], rng.uniform(-3, 3, 197)])
    op = dense_operator(lam, seed=3)
    res = run(op, len(lam), 3, True, basis=8, max_products=products)
    measured = [float(torch.linalg.vector_norm(op(x) - v * x)) for v, x in zip(res.values, res.vectors)]
    np.testing.assert_allclose(res.residuals, measured, rtol=1e-6, atol=1e-13 * np.abs(lam).max())
    if products == 400:
        assert res.converged.all() and res.verified and res.values[1] == pytest.approx(5.0, rel=1e-12)
    else:
        assert not res.converged.all()


def test_unconverged_values_are_flagged_never_wrong() -> None:
    lam = spectrum("clustered", 300)
    truth = np.sort(lam)[::-1][:5]
    for products in (12, 30, 60, 120, 2000):
        res = run(dense_operator(lam), len(lam), 5, True, basis=10, max_products=products)
        assert np.all(np.abs(res.values - truth)[res.converged] <= 1e-8 * 10), products
    assert res.converged.all()


def test_the_stored_vectors_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model-sized buffer comes from lanczos._vectors: no more than basis + k + 1 rows live at once."""
    live, most, largest = [0], [0], [0]
    allocate = lz._vectors

    def counted(rows: int, n: int, device: torch.device) -> torch.Tensor:
        t = allocate(rows, n, device)
        live[0] += rows
        most[0], largest[0] = max(most[0], live[0]), max(largest[0], rows)
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - rows))
        return t

    monkeypatch.setattr(lz, "_vectors", counted)
    lam = spectrum("repeated", 300)
    k, basis = 4, 9
    res = run(dense_operator(lam), len(lam), k, True, basis=basis, max_products=3000)
    assert res.converged.all() and res.steps > 5 * basis  # many restarts, and check runs
    assert largest[0] == basis and most[0] <= basis + k + 1, (largest, most)
    del res
    assert live[0] == 0


def test_budget() -> None:
    """`max_products` caps every run's products exactly; without it a run gets max(max_steps, 20 x basis)."""
    lam = np.linspace(0, 1, 3000) ** 3  # a dense top: nothing settles to 1e-13 quickly
    op = diagonal_operator(lam)
    res = run(op, len(lam), 3, True, tol=1e-13, basis=8, max_products=37)
    assert res.steps == 37 and not res.converged.any() and not res.verified
    res = run(op, len(lam), 3, True, tol=1e-13, max_steps=5, basis=8)
    assert res.steps == default_products(5, 8) == 160
    assert default_products(500, 8) == 500


def test_an_invariant_space_smaller_than_k_goes_on_from_fresh_directions() -> None:
    """Three distinct eigenvalues: each Krylov space has dimension 3, yet k = 5 copies of the top are found."""
    lam = np.repeat([3.0, 1.0, -2.0], [10, 20, 20])
    res = run(dense_operator(lam), len(lam), 5, True, basis=8)
    np.testing.assert_allclose(res.values, 3.0, rtol=1e-12)
    assert res.converged.all() and res.verified and len(res.residuals) == 5
    torch.testing.assert_close(res.vectors @ res.vectors.T, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)


def test_small_operators_and_bad_bases() -> None:
    lam = np.array([2.0, -1.0, 0.5, 3.0, 1.0])
    for k in (1, 4, 5):
        res = run(dense_operator(lam), 5, k, False)
        np.testing.assert_allclose(res.values, np.sort(lam)[:k], atol=1e-12)
        assert res.converged.all()
    with pytest.raises(ValueError, match="at least 7 vectors"):
        run(dense_operator(spectrum("wide")), 200, 5, True, basis=6)


def test_memory_formulas() -> None:
    n = 10 ** 8
    assert default_basis(5) == 30 and default_basis(20) == 50
    # one buffer of the basis and a product vector: the check run lives beside the Ritz vectors, in the same rows
    assert lanczos_memory(n, 5) == 8 * (n * (30 + 1) + 2 * 30 * CHUNK)
    assert lanczos_memory(n, 10, basis=15) == 8 * (n * 16 + 2 * 15 * CHUNK)
    assert lanczos_memory(n, 5, basis=7) == 8 * (n * (5 + 3 + 1) + 2 * 7 * CHUNK)  # the check run needs 3 rows
    assert lanczos_memory(4, 2) == 8 * (4 * (4 + 1) + 2 * 4 * 4)  # the basis never exceeds n
    assert lanczos_memory(4, 4) == 8 * (4 * (4 + 1) + 2 * 4 * 4)  # k = n: no check run
    assert slq_memory(n, 80) == 8 * n * 82 and slq_memory(n, 80, "none") == 8 * n * 4
    with pytest.raises(ValueError, match="reorthogonalise"):
        slq_memory(n, 80, "partial")
    with pytest.raises(ValueError, match="reorthogonalise"):
        quadrature(diagonal_operator(np.ones(3)), torch.ones(3, dtype=torch.float64), 2, reorthogonalise="some")


#: glibc's fixed mmap threshold: every buffer of 128 KiB or more is mapped on its own and returned when freed, so
#: that one stage's freed vectors are not counted again in the next's resident size (the default threshold grows
#: with the sizes freed, and freed heap memory stays resident).
FREED = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

MEMORY_PROBE = r"""
import json, sys, torch
from curvscope.curvature.lanczos import extreme_eigenpairs, lanczos_memory, quadrature, slq_memory

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident size

n, k, basis, products, steps = map(int, sys.argv[1:])
d = torch.linspace(0, 1, n, dtype=torch.float64) ** 3
op = lambda v, out=None: torch.mul(d, v, out=out)
op(d, torch.empty_like(d))
small = torch.linspace(0, 1, 200, dtype=torch.float64)  # load the libraries' code (LAPACK, BLAS) before measuring
small_op = lambda v, out=None: torch.mul(small, v, out=out)
extreme_eigenpairs(small_op, 200, k, True, tol=1e-13, max_steps=1, max_products=products, basis=basis,
                   generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
quadrature(small_op, small, 20, reorthogonalise="none")
out = {}
reset()
base = status("VmRSS")
res = extreme_eigenpairs(op, n, k, True, tol=1e-13, max_steps=1, max_products=products, basis=basis,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
out["eig"] = [status("VmHWM") - base, lanczos_memory(n, k, basis), res.steps]
del res
d[-k:] = torch.arange(2.0, 2.0 + k, dtype=torch.float64)  # separated top eigenvalues: the run settles, then checks
d[-k - 1] = 1.99  # the next one close below: the check run needs more steps than its basis holds
reset()
base = status("VmRSS")
res = extreme_eigenpairs(op, n, k, True, tol=1e-8, max_steps=1, max_products=products, basis=basis,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
out["checked"] = [status("VmHWM") - base, lanczos_memory(n, k, basis), bool(res.verified)]
del res
probe = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
reset()
base = status("VmRSS")
theta, _ = quadrature(op, probe, steps, reorthogonalise="none")
out["slq"] = [status("VmHWM") - base, slq_memory(n, steps, "none") - 8 * n, len(theta)]
print(json.dumps(out))
"""


def test_peak_memory_is_the_bounded_basis() -> None:
    """In a fresh process, the resident peak of a 60-product run grows by the bounded basis only, far below the
    60 vectors a full basis would hold, and a run that settles and checks its values holds no more; SLQ without
    reorthogonalisation holds three vectors besides its probe."""
    n, k, basis, products, steps = 500_000, 5, 12, 60, 60
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *map(str, (n, k, basis, products, steps))],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **FREED})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    slack = 2 * 1024 ** 2  # half a vector
    peak, bound, used = out["eig"]
    assert used == products
    assert peak <= bound + slack < 8 * n * products, (peak, bound)
    peak, bound, verified = out["checked"]  # the check run adds no vector
    assert verified and peak <= bound + slack, (peak, bound)
    peak, bound, nodes = out["slq"]
    assert nodes == steps and peak <= bound + slack < 8 * n * steps, (peak, bound)


def known_spectra(n: int = 4000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = np.array([0.0, 1.0, 2.0, 5.0, 10.0])
    rest = n - n // 2 - 10
    return {
        "clustered": np.concatenate([rng.choice(centres, n - 5) + 1e-3 * rng.standard_normal(n - 5),
                                     [20.0, 30.0, 40.0, 50.0, 60.0]]),
        "repeated": np.concatenate([np.zeros(n // 2), np.repeat([1.0, 2.0, 3.0], [rest - 2 * (rest // 3)] +
                                                                [rest // 3] * 2), np.linspace(5, 50, 10)]),
        "wide": np.concatenate([10 ** rng.uniform(-6, 3, n - n // 4), -(10 ** rng.uniform(-6, 1, n // 4))]),
        "hessian-like": np.concatenate([0.3 * (rng.beta(2, 2, n - 10) - 0.3), np.geomspace(1, 10, 10)]),
    }


@pytest.mark.parametrize("name", ["clustered", "repeated", "wide", "hessian-like"])
def test_slq_without_reorthogonalisation_matches_full(name: str) -> None:
    """Same probe, 80 steps: the densities (σ = 1 % of the span) agree to 1e-5 of their peak (measured over these
    spectra, 40 to 200 steps, diagonal and rotated: ≤ 9e-7, here ≤ 3e-14), the moments j ≤ 4 to 1e-10 (≤ 5e-14),
    the top node to 1e-10 of the span (≤ 4e-15), and the two discrete measures lie within 2e-3 of the span in
    Wasserstein-1 distance (≤ 7e-4, the size of either quadrature's own distance to the exact measure)."""
    lam = known_spectra()[name]
    op = diagonal_operator(lam)
    span = np.ptp(lam)
    probe = torch.randn(len(lam), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tf, wf = quadrature(op, probe, 80)
    tn, wn = quadrature(op, probe, 80, reorthogonalise="none")
    assert wn.sum() == pytest.approx(1.0, abs=1e-12) and len(tn) <= 80
    sigma = 0.01 * span
    grid = np.linspace(lam.min() - 5 * sigma, lam.max() + 5 * sigma, 2000)
    df, dn = (gaussian_density(t, w, sigma=sigma, grid=grid)[1] for t, w in ((tf, wf), (tn, wn)))
    assert np.abs(df - dn).max() <= 1e-5 * df.max()
    xw = probe.numpy() ** 2 / float(probe @ probe)
    for j in range(1, 5):
        exact = float(np.sum(xw * lam ** j))
        assert abs(np.sum(wn * tn ** j) - exact) <= 1e-10 * abs(exact), j
    assert abs(tn.max() - tf.max()) <= 1e-10 * span
    assert wasserstein_distance(tf, tn, wf, wn) <= 2e-3 * span


def test_slq_without_reorthogonalisation_shows_ghosts() -> None:
    """Converged outliers come back as near-identical copies sharing their weight; full reorthogonalisation has none."""
    lam = known_spectra()["clustered"]
    probe = torch.randn(len(lam), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tf, wf = quadrature(diagonal_operator(lam), probe, 200)
    tn, wn = quadrature(diagonal_operator(lam), probe, 200, reorthogonalise="none")
    gap = 1e-9 * np.ptp(lam)
    assert np.sum(np.diff(np.sort(tf)) <= gap) == 0 < np.sum(np.diff(np.sort(tn)) <= gap)
    near = np.abs(tn - 60.0) <= 1e-6
    assert near.sum() > 1 and np.sum(wn[near]) == pytest.approx(np.sum(wf[np.abs(tf - 60.0) <= 1e-6]), rel=1e-8)


@pytest.mark.parametrize("name", ["outliers", "repeated"])
def test_the_bottom_run_deflated_against_the_top_eigenvectors(name: str) -> None:
    """Kept orthogonal to the top 5 eigenvectors (as spectrum() does), the bottom run finds the bottom 5 of the
    dense reference to its tolerance, its residuals are the true ‖H x − θ x‖ (coupling to the deflated rows
    included), and on a Hessian-like spectrum (a few large outliers over a bulk near 0) it takes fewer products."""
    n, k = 300, 5
    rng = np.random.default_rng(3)
    lam = (np.concatenate([[80.0, 60.0, 45.0, 30.0, 20.0], rng.uniform(-0.5, 2.0, n - 5)]) if name == "outliers"
           else spectrum("repeated", n))
    op = dense_operator(lam)
    top = run(op, n, k, True, tol=1e-10, basis=20)
    assert top.converged.all()
    plain = run(op, n, k, False, tol=1e-9, basis=20)
    deflated = run(op, n, k, False, tol=1e-9, basis=20, deflate=top.vectors.clone())
    np.testing.assert_allclose(deflated.values, np.sort(lam)[:k], atol=1e-9 * np.abs(lam).max())
    assert deflated.converged.all() and deflated.verified
    for theta, x, r in zip(deflated.values, deflated.vectors, deflated.residuals):
        true = float(torch.linalg.vector_norm(op(x) - theta * x))
        assert true <= r + 1e-12 * np.abs(lam).max()
    assert float(torch.linalg.matrix_norm(deflated.vectors @ top.vectors.T)) < 1e-8  # the run kept out of them
    if name == "outliers":
        assert deflated.steps < plain.steps, (deflated.steps, plain.steps)
