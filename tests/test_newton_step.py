"""H̄⁻¹, η* and the predicted decrease; the pseudo-inverse when H̄ is singular."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import dense, make_case

from curvscope import newton_step, pseudo_hessian


def test_inverse_of_a_real_pseudo_hessian() -> None:
    case = make_case("cnn")
    res = pseudo_hessian(case.model, case.loss_fn, case.batches())
    step = newton_step(res.pseudo_hessian, res.pseudo_gradient)
    S = len(res.names)
    assert step.method == "inverse" and step.rank == S
    np.testing.assert_allclose(res.pseudo_hessian @ step.inverse, np.eye(S), atol=1e-8)
    np.testing.assert_allclose(step.learning_rates, np.linalg.solve(res.pseudo_hessian, res.pseudo_gradient),
                               rtol=1e-8)
    assert step.predicted_decrease == pytest.approx(0.5 * res.pseudo_gradient @ step.learning_rates)
    np.testing.assert_allclose(step.eigenvalues, np.linalg.eigvalsh(res.pseudo_hessian), rtol=1e-10)
    assert np.all(np.diff(step.eigenvalues) >= 0)


def test_predicted_decrease_is_the_quadratic_model_maximum() -> None:
    h = np.array([[4.0, 1.0], [1.0, 3.0]])
    g = np.array([1.0, 2.0])
    step = newton_step(h, g)

    def q(eta: np.ndarray) -> float:
        return float(g @ eta - 0.5 * eta @ h @ eta)

    assert q(step.learning_rates) == pytest.approx(step.predicted_decrease, rel=1e-14)
    rng = np.random.default_rng(0)
    assert all(q(step.learning_rates + 1e-3 * rng.standard_normal(2)) < step.predicted_decrease for _ in range(50))
    assert step.positive_definite and step.condition_number == pytest.approx(
        (7 + np.sqrt(5)) / (7 - np.sqrt(5)))


def test_cauchy_step_from_the_trivial_partition() -> None:
    case = make_case("mlp")
    d = dense(case)
    g, h = d.gradient.numpy(), d.hessian.numpy()
    res = pseudo_hessian(case.model, case.loss_fn, case.batches(), "trivial")
    step = newton_step(res.pseudo_hessian, res.pseudo_gradient)
    assert step.learning_rates[0] == pytest.approx((g @ g) / (g @ h @ g), rel=1e-10)


def test_singular_uses_the_pseudo_inverse_and_says_so() -> None:
    h = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    g = np.array([1.0, 1.0, 1.0])
    step = newton_step(h, g)
    assert step.method == "pseudo-inverse" and step.rank == 2
    assert step.condition_number == np.inf and not step.positive_definite
    np.testing.assert_allclose(step.inverse, np.linalg.pinv(h), atol=1e-14)
    np.testing.assert_allclose(h @ step.inverse @ h, h, atol=1e-14)


def test_indefinite_is_inverted_not_regularised() -> None:
    h = np.diag([2.0, -1.0])
    step = newton_step(h, np.array([1.0, 1.0]))
    assert step.method == "inverse" and not step.positive_definite
    np.testing.assert_allclose(step.inverse, np.diag([0.5, -1.0]))
    assert step.predicted_decrease == pytest.approx(0.5 * (0.5 - 1.0))


def test_zero_gradient_groups_are_excluded_not_garbage() -> None:
    h = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    g = np.array([1.0, 0.0, 2.0])
    step = newton_step(h, g)
    assert step.excluded.tolist() == [False, True, False]
    assert step.method == "inverse" and step.positive_definite and step.rank == 2
    kept = np.linalg.inv(h[np.ix_([0, 2], [0, 2])])
    np.testing.assert_allclose(step.inverse[np.ix_([0, 2], [0, 2])], kept)
    assert np.all(step.inverse[1] == 0) and np.all(step.inverse[:, 1] == 0) and step.learning_rates[1] == 0
