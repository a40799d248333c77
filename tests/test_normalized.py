"""N(M)_st = M_st / sqrt(|M_ss M_tt|) and its invariance under rescaling."""
from __future__ import annotations

import numpy as np

from curvscope.measures.normalized import normalized


def test_known_values_and_unit_diagonal() -> None:
    m = np.array([[4.0, -2.0], [-2.0, -9.0]])
    np.testing.assert_allclose(normalized(m), [[1.0, -2.0 / 6.0], [-2.0 / 6.0, -1.0]])


def test_invariant_under_rescaling_tensors() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 5))
    m = a @ a.T
    d = np.diag(rng.uniform(0.1, 10, 5) * rng.choice([-1, 1], 5))
    np.testing.assert_allclose(np.abs(normalized(d @ m @ d)), np.abs(normalized(m)), rtol=1e-12)


def test_zero_diagonal_gives_nan_not_inf() -> None:
    m = np.array([[1.0, 0.0], [0.0, 0.0]])
    out = normalized(m)
    assert out[0, 0] == 1.0 and np.isnan(out[1]).all() and np.isnan(out[:, 1]).all()
