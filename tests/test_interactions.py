"""Interaction measures on hand-made matrices with known answers, and the actual-loss check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvscope import newton_step, pseudo_hessian
from curvscope.curvature.objective import Objective
from curvscope.curvature.operator import full_gradient
from curvscope.curvature.partition import trainable
from curvscope.curvature.step_loss import loss_after_steps
from curvscope.measures.interactions import (
    block_mask,
    distance_profile,
    interactions,
    layer_index,
    off_block_ratio,
    part_mask,
    quadratic_model,
    steps,
)

KINDS = np.array(["weight", "bias", "weight", "bias", "weight"])
LAYERS = np.array(["a", "a", "b", "b", "c"])


def test_block_masks() -> None:
    assert layer_index(LAYERS).tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_array_equal(block_mask(LAYERS, "tensor"), np.eye(5, dtype=bool))
    layer = block_mask(LAYERS, "layer")
    assert layer[0, 1] and layer[2, 3] and not layer[1, 2] and layer.sum() == 4 + 4 + 1
    assert part_mask(KINDS, "weight-bias")[0, 1] and part_mask(KINDS, "weight-bias")[1, 0]
    assert part_mask(KINDS, "weight-weight").sum() == 9 and part_mask(KINDS, "bias-bias").sum() == 4


def test_block_diagonal_matrix_has_no_interaction() -> None:
    rng = np.random.default_rng(0)
    h = np.zeros((5, 5))
    for sl in (slice(0, 2), slice(2, 4), slice(4, 5)):
        a = rng.standard_normal((sl.stop - sl.start,) * 2)
        h[sl, sl] = a @ a.T + np.eye(sl.stop - sl.start)
    g = rng.uniform(0.5, 1, 5)
    inv = newton_step(h, g).inverse
    res = interactions(g, h, np.full((5, 5), 1e-3), inv, KINDS, LAYERS, True)
    for m in res.matrices:
        assert m.off_block_ratio[1, 0] == pytest.approx(0, abs=1e-15)  # layer grouping, all entries
        assert m.off_block_ratio[0, 0] > 0  # the tensor grouping does see the weight-bias couplings
    layer_steps = [s for s in res.steps if s.grouping == "layer"]
    assert len(layer_steps) == 2 and all(s.efficiency == pytest.approx(1, abs=1e-12) for s in layer_steps)
    newton = res.steps[0]
    assert newton.name == "newton" and newton.efficiency == pytest.approx(1)
    mean, peak, count = res.matrix("hessian").distance_mean, res.matrix("hessian").distance_max, \
        res.matrix("hessian").distance_count
    assert mean[0] > 0 and peak[1] == 0 and peak[2] == 0 and count.tolist() == [4, 12, 4]


def test_three_by_three_by_hand() -> None:
    """H̄ = [[2,1,0],[1,2,1],[0,1,2]], ḡ = (1,1,1), three tensors of three layers."""
    h = np.array([[2.0, 1, 0], [1, 2, 1], [0, 1, 2]])
    g = np.ones(3)
    layers = np.array(["x", "y", "z"])
    # N(H̄) = H̄/2: off-diagonal Frobenius² = 4·(1/2)² = 1, total² = 3 + 1 = 4 → r = 1/2
    assert off_block_ratio(h, block_mask(layers, "tensor")) == pytest.approx(0.5)
    mean, peak, count = distance_profile(h, layers)
    np.testing.assert_allclose(mean, [np.nan, 0.5, 0.0])
    assert count.tolist() == [0, 4, 2]
    inv = np.linalg.inv(h)  # [[3,-2,1],[-2,4,-2],[1,-2,3]]/4
    np.testing.assert_allclose(inv * 4, [[3, -2, 1], [-2, 4, -2], [1, -2, 3]])
    out = {s.name: s for s in steps(g, h, inv, layers, True)}
    # η* = H̄⁻¹ḡ = (1/2, 0, 1/2), q* = ½ ḡᵀη* = 1/2
    np.testing.assert_allclose(out["newton"].learning_rates, [0.5, 0, 0.5], atol=1e-15)
    assert out["newton"].predicted == pytest.approx(0.5)
    # diagonal Hessian: η = ḡ/diag = 1/2 each; q = 3/2 − ½·(1/4)·10 = 1/4 → e = 1/2
    np.testing.assert_allclose(out["block-diagonal hessian (tensor)"].learning_rates, [0.5, 0.5, 0.5])
    assert out["block-diagonal hessian (tensor)"].efficiency == pytest.approx(0.5)
    # diagonal inverse: η = (3/4, 1, 3/4); q = 5/2 − ½·(η H̄ η = 35/8 − ... ) computed directly
    eta = np.array([0.75, 1.0, 0.75])
    np.testing.assert_allclose(out["block-diagonal inverse (tensor)"].learning_rates, eta)
    assert out["block-diagonal inverse (tensor)"].predicted == pytest.approx(2.5 - 0.5 * eta @ h @ eta)
    assert out["block-diagonal inverse (tensor)"].efficiency == pytest.approx((2.5 - 0.5 * eta @ h @ eta) / 0.5)
    # Cauchy: η = 3/10 for all, q = 3·0.3 − ½·0.09·10 = 0.45 → e = 0.9
    np.testing.assert_allclose(out["cauchy"].learning_rates, [0.3] * 3)
    assert out["cauchy"].efficiency == pytest.approx(0.9)


def test_indefinite_leaves_efficiency_undefined_and_significance() -> None:
    h = np.array([[1.0, 3.0], [3.0, 1.0]])
    g = np.array([1.0, 2.0])
    stderr = np.array([[0.1, 2.0], [2.0, 0.1]])
    res = interactions(g, h, stderr, np.linalg.inv(h), np.array(["weight", "bias"]), np.array(["a", "a"]), False)
    assert all(np.isnan(s.efficiency) for s in res.steps)
    assert res.significant_count == 0 and not res.significant.any()  # 3 < 2·2
    res = interactions(g, h, stderr / 10, np.linalg.inv(h), np.array(["weight", "bias"]), np.array(["a", "a"]), False)
    assert res.significant_count == 1 and res.significant[0, 1] and not res.significant[0, 0]
    one_batch = interactions(g, h, np.full((2, 2), np.nan), np.linalg.inv(h), np.array(["weight", "bias"]),
                             np.array(["a", "a"]), False)
    assert one_batch.significant_count == -1


class Quadratic(nn.Module):
    """A model whose loss is exactly quadratic in its parameters: L = ½ Σ_n (aᵀx_n + b·c − y_n)² with c fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(1)


def test_predicted_equals_actual_for_an_exactly_quadratic_loss() -> None:
    torch.manual_seed(0)
    model = Quadratic().double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    loss_fn = torch.nn.functional.mse_loss
    res = pseudo_hessian(model, loss_fn, batches)
    step = newton_step(res.pseudo_hessian, res.pseudo_gradient)
    all_steps = steps(res.pseudo_gradient, res.pseudo_hessian, step.inverse, res.layers, step.positive_definite)
    loss0, after = loss_after_steps(model, loss_fn, batches, "canonical", [s.learning_rates for s in all_steps])
    for s, value in zip(all_steps, after):
        assert loss0 - value == pytest.approx(s.predicted, rel=1e-10, abs=1e-14), s.name
    assert quadratic_model(step.learning_rates, res.pseudo_gradient, res.pseudo_hessian) == \
        pytest.approx(step.predicted_decrease)
    assert model.lin.weight.grad is None  # the caller's model is untouched
    obj = Objective.create(model, loss_fn, batches)  # a gradient computed once and passed in gives the same losses
    given = loss_after_steps(model, loss_fn, batches, "canonical", [s.learning_rates for s in all_steps],
                             gradient=full_gradient(obj, [p for _, p in trainable(model)]))
    assert given[0] == loss0 and np.array_equal(given[1], after)
