"""The order-3 diagonal D (hessian.py) against nested autograd, and the cubic-regularised learning rates
(measures/cubic.py): their fixed point, their limits, their failures, and the author's own code when it is at
hand (GRNEWT_SRC: the src/grnewt folder of a GroupedNewton checkout)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_case
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope import curvature_operator
from curvscope.curvature.operator import full_gradient
from curvscope.curvature.partition import make_partition
from curvscope.measures.cubic import DAMPING_GRID, cubic_learning_rates, cubic_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import peers  # noqa: E402 - the peer libraries of the benchmark


def dense_order3(model: nn.Module, loss_fn, batches, part_kind: str = "canonical") -> np.ndarray:
    """d³/dη³ L(θ − η U_s) at η = 0 for each group s, by three nested derivatives of a function of one scalar."""
    with sdpa_kernel(SDPBackend.MATH):  # the reference attention kernel, with every derivative
        return _dense_order3(model, loss_fn, batches, part_kind)


def _dense_order3(model: nn.Module, loss_fn, batches, part_kind: str) -> np.ndarray:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    n_total = sum(len(y) for _, y in batches)

    def loss(values: dict) -> torch.Tensor:
        return sum(len(y) / n_total * loss_fn(functional_call(model, values, (x,)), y) for x, y in batches)

    flat = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    grads = dict(zip(names, torch.autograd.grad(loss(flat), [flat[n] for n in names])))
    part = make_partition(model, part_kind)
    out = []
    for s in range(part.size):
        eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
        moved = {}
        for n, a in zip(names, part.assignment):
            mask = torch.as_tensor(a == s) if isinstance(a, torch.Tensor) else torch.tensor(a == s)
            moved[n] = params[n] - eta * grads[n] * mask
        value = loss(moved)
        (d1,) = torch.autograd.grad(value, eta, create_graph=True)
        (d2,) = torch.autograd.grad(d1, eta, create_graph=True)
        (d3,) = torch.autograd.grad(d2, eta, allow_unused=True)
        out.append(0.0 if d3 is None else float(d3))
    return np.asarray(out)


def ours(model: nn.Module, loss_fn, batches, part_kind: str = "canonical") -> tuple[np.ndarray, np.ndarray]:
    with curvature_operator(model, loss_fn, batches) as op:
        part = make_partition(op.obj.model, part_kind)
        return op.order3(part, full_gradient(op.obj, op.params))


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm", "attention"])
def test_order3_matches_nested_autograd(name: str) -> None:
    case = make_case(name, n=12)
    batches = case.batches([5, 4, 3])
    d, stderr = ours(case.model, case.loss_fn, batches)
    ref = dense_order3(case.model, case.loss_fn, batches)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    assert np.all(np.isfinite(stderr)) and np.all(stderr >= 0)


def test_order3_with_batchnorm_in_eval_mode_and_the_discrete_partition() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 4, dtype=torch.float64))  # running statistics of some data
    model.eval()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    loss_fn = nn.functional.cross_entropy
    for kind in ("canonical", "discrete"):
        np.testing.assert_allclose(ours(model, loss_fn, batches, kind)[0], dense_order3(model, loss_fn, batches, kind),
                                   rtol=1e-9, atol=1e-13)


def test_order3_does_not_depend_on_the_batching() -> None:
    case = make_case("cnn", n=12)
    one = ours(case.model, case.loss_fn, case.batches())[0]
    many = ours(case.model, case.loss_fn, case.batches([2, 7, 3]))[0]
    np.testing.assert_allclose(many, one, rtol=1e-11, atol=1e-14)


def test_order3_is_zero_for_a_quadratic_loss_of_a_linear_model() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    d, _ = ours(model, nn.functional.mse_loss, [(x, y)])
    assert np.all(np.abs(d) < 1e-12)


# --------------------------------------------------------------------------- the learning rates

def _problem(seed: int, S: int = 5, definite: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(S, S))
    h = a @ a.T + 0.5 * np.eye(S)
    if not definite:
        w, v = np.linalg.eigh(h)
        w[0] = -abs(w[-1]) * 0.3
        h = (v * w) @ v.T
    return h, rng.normal(size=S), rng.normal(size=S) * 2


def _fixed_point(h: np.ndarray, g: np.ndarray, d: np.ndarray, lam: float, eta: np.ndarray) -> float:
    """‖Mη − ḡ‖ relative to the size of its terms, M = H̄ + ½λ‖Dη‖D²: round-off when η is the fixed point."""
    m = h + 0.5 * lam * np.linalg.norm(d * eta) * np.diag(d * d)
    return float(np.linalg.norm(m @ eta - g) / (np.linalg.norm(m, 2) * np.linalg.norm(eta) + np.linalg.norm(g)))


@pytest.mark.parametrize("definite", [True, False])
@pytest.mark.parametrize("lam", [1e-2, 1.0, 100.0])
def test_learning_rates_satisfy_their_fixed_point(definite: bool, lam: float) -> None:
    h, g, d = _problem(3, definite=definite)
    step = cubic_learning_rates(h, g, d, lam)
    assert step.found and step.reason == ""
    assert _fixed_point(h, g, d, lam, step.learning_rates) < 1e-12 and step.residual < 1e-12
    assert step.r == pytest.approx(np.linalg.norm(d * step.learning_rates), rel=1e-10)
    assert np.linalg.eigvalsh(h + 0.5 * lam * step.r * np.diag(d * d))[0] > 0  # the root above r0
    assert step.start == ("positive definite" if definite else "analytical")
    assert step.predicted_decrease == pytest.approx(cubic_model(step.learning_rates, g, h, d, lam))


def test_singular_order3_uses_the_numerical_start() -> None:
    h, g, d = _problem(4, definite=False)
    d[2] = 0.0  # a group without third-order information
    w, v = np.linalg.eigh(h)
    step = cubic_learning_rates(h, g, d, 1.0)
    if step.found:
        assert step.start == "numerical" and _fixed_point(h, g, d, 1.0, step.learning_rates) < 1e-12
    else:  # negative curvature along the group with D_s = 0: no regularisation can fix it
        assert "never becomes positive definite" in step.reason and np.isnan(step.learning_rates).all()


def test_negative_curvature_where_order3_vanishes_has_no_step() -> None:
    h = np.diag([2.0, -1.0])
    step = cubic_learning_rates(h, np.array([1.0, 1.0]), np.array([1.0, 0.0]), 1.0)
    assert not step.found and "never becomes positive definite" in step.reason
    assert np.isnan(step.learning_rates).all() and np.isnan(step.predicted_decrease)


def test_no_root_is_flagged_not_hidden() -> None:
    h = np.diag([-1.0, 2.0])
    step = cubic_learning_rates(h, np.array([0.0, 1.0]), np.array([1.0, 1.0]), 1.0)  # ḡ misses the bad direction
    assert not step.found and "no root" in step.reason and np.isnan(step.learning_rates).all()


def test_indefinite_without_damping_is_refused_as_not_found() -> None:
    h, g, d = _problem(5, definite=False)
    step = cubic_learning_rates(h, g, d, 0.0)
    assert not step.found and "λ_int = 0" in step.reason


def test_vanishing_damping_gives_newtons_step() -> None:
    h, g, d = _problem(6)
    newton = np.linalg.solve(h, g)
    for lam, tol in ((1e-4, 1e-3), (1e-8, 1e-7)):
        step = cubic_learning_rates(h, g, d, lam)
        assert np.linalg.norm(step.learning_rates - newton) / np.linalg.norm(newton) < tol


def test_more_damping_shortens_the_step() -> None:
    h, g, d = _problem(7)
    norms = [np.linalg.norm(d * cubic_learning_rates(h, g, d, lam).learning_rates) for lam in DAMPING_GRID]
    assert all(a > b for a, b in zip(norms, norms[1:]))


# --------------------------------------------------------------------------- the author's code

def _grnewt() -> None:
    src = os.environ.get("GRNEWT_SRC")
    if not src or not (Path(src) / "nesterov.py").is_file():
        pytest.skip("GRNEWT_SRC does not name the src/grnewt folder of a GroupedNewton checkout")
    peers.load_grnewt(src)


def test_order3_and_learning_rates_match_the_authors_code() -> None:
    _grnewt()
    from grnewt.hg import compute_Hg_fullbatch
    from grnewt.nesterov import nesterov_lrs
    from grnewt.util.param_struct import ParamStructure

    case = make_case("cnn", n=12)
    batches = case.batches([5, 4, 3])
    part = make_partition(case.model, "canonical")
    with curvature_operator(case.model, case.loss_fn, batches) as op:
        grad = full_gradient(op.obj, op.params)
        res = op.projection(part, gradient=grad)
        d, _ = op.order3(part, grad)
    groups = [{"params": [p]} for p in case.model.parameters()]
    ps = ParamStructure(groups)
    direction = tuple(g.to(torch.float64) for g in grad[0])
    full_loss = lambda x, y: case.loss_fn(case.model(x), y)  # noqa: E731 - their signature
    H, g, order3 = compute_Hg_fullbatch(ps, full_loss, batches, 12, direction, loader_pre_hook=lambda x, y: (x, y),
                                        noregul=False)
    np.testing.assert_allclose(H.numpy(), res.pseudo_hessian, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(-order3.numpy(), d, rtol=1e-10, atol=1e-14)  # their order3 is along +U: −D
    for lam in (0.1, 1.0, 10.0):
        lrs, logs = nesterov_lrs(H, g, order3, damping_int=lam)
        step = cubic_learning_rates(res.pseudo_hessian, res.pseudo_gradient, d, lam)
        assert step.found == bool(logs["found"])
        if step.found:
            np.testing.assert_allclose(step.learning_rates, lrs.numpy(), rtol=1e-8)


# --------------------------------------------------------------------------- end to end

def test_analyse_with_order3_stores_reports_and_draws(tmp_path: Path) -> None:
    import h5py
    from click.testing import CliRunner
    from conftest import write_tiny_bundle

    from curvscope.cli.main import main

    ck = write_tiny_bundle(tmp_path / "tiny_ep03.pt")
    out = tmp_path / "r.h5"
    res = CliRunner().invoke(main, ["analyse", str(ck), "-o", str(out), "--no-spectrum", "--order3", "--damping-int",
                                    "0.5", "--damping-int", "2", "--curvature", "hessian", "--curvature", "ggn"])
    assert res.exit_code == 0, res.output
    assert "cubic step (λ_int=0.5)" in res.output and "cubic step (λ_int=2)" in res.output
    with h5py.File(out) as fh:
        grp = fh["checkpoints/tiny_ep03"]
        lams = grp["order3/cubic/damping_int"][()]
        assert 0.5 in lams and 2.0 in lams and 1e-3 in lams and grp["order3/diagonal"].shape == (4,)
        assert grp["order3/cubic/requested"][()].sum() == 2
        kinds = [k.decode() for k in grp["interactions/steps/kind"][()]]
        assert kinds.count("cubic") == 2
        asked = grp["order3/cubic/requested"][()]  # the rows asked for carry the same losses as order3/cubic/
        np.testing.assert_array_equal(grp["interactions/steps/actual_decrease"][()][np.array(kinds) == "cubic"],
                                      grp["order3/cubic/actual_decrease"][()][asked])
        assert "order3" not in fh["checkpoints/tiny_ep03@ggn"]  # D is the loss's, beside the Hessian only
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "order-3 diagonal D" in info.output and "cubic step (λ_int=2)" in info.output
    assert (tmp_path / "r" / "tiny_ep03-cubic.pdf").read_bytes()[:5] == b"%PDF-"
    from curvscope.figures.cubic import cubic_figure
    from curvscope.store.hdf5 import read_results

    d_panel = cubic_figure(read_results(out)[0]).axes[1]  # D as points with error bars, not bars from a floor
    assert not d_panel.patches and sum(len(line.get_xdata()) for line in d_panel.lines
                                       if line.get_marker() == "o") == 4
    with h5py.File(out, "a") as fh:  # a tampered choice is refused like any other
        del fh["checkpoints/tiny_ep03/order3/cubic/start"]
        fh["checkpoints/tiny_ep03/order3/cubic/start"] = np.array([b"guess"] * len(lams), dtype=object)
    bad = CliRunner().invoke(main, ["info", str(out)])
    assert bad.exit_code == 2 and "start" in bad.output


def test_damping_int_is_checked() -> None:
    from click.testing import CliRunner

    from curvscope.cli.main import main

    res = CliRunner().invoke(main, ["analyse", "x.pt", "--damping-int", "-1"])
    assert res.exit_code == 2 and "damping-int" in res.output
