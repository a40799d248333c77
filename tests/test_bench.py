"""The benchmark's helpers: tools take turns and each keeps its fastest result; peers free their copies; the
curvatures suite's rows and its peak-memory measure."""
from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from curvscope.sources.zoo import MLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import peers  # noqa: E402
from bench import curvature_rows, curvatures_markdown, interleaved, peak_rss  # noqa: E402
from peers import _timed  # noqa: E402


def test_tools_take_turns_and_keep_their_fastest_result() -> None:
    calls: list[str] = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([0.5, 4.0, 0.7])}

    def tool(name: str):
        def run() -> SimpleNamespace:
            calls.append(name)
            return SimpleNamespace(seconds=next(times[name]), name=name)
        return run

    best = interleaved({"a": tool("a"), "b": tool("b")}, repeat=3)
    assert calls == ["a", "b"] * 3
    assert best["a"].seconds == 1.0 and best["b"].seconds == 0.5


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
def test_peer_runs_free_their_model_copy_after_create_graph_backward() -> None:
    """PyHessian's backward(create_graph=True) ties each parameter to its .grad in a cycle through
    C++ that gc cannot free; every peer run goes through `_timed`, which drops its copy's grads, so a
    benchmark run does not pile up copies."""

    def leaves_alive(through_timed: bool) -> bool:
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))

        def run(net: torch.nn.Module = net) -> tuple[None, str]:
            net(torch.randn(5, 4)).square().sum().backward(create_graph=True)
            return None, ""

        ref = weakref.ref(net[0].weight)
        if through_timed:
            assert _timed(run, seed=0, net=net).error is None
        else:
            run()
        del net, run
        gc.collect()
        return ref() is not None

    assert leaves_alive(through_timed=False)  # the leak is real, so the next line tests something
    assert not leaves_alive(through_timed=True)


def _dense_reference(model: torch.nn.Module, batches: list) -> dict[str, np.ndarray]:
    """Uᵀ C U from the full H, G and F of the loss (1/N) Σ_n cross_entropy(z_n, y_n), built sample by sample."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def out(flat: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, sizes), shapes))))
        return functional_call(model, parts, (xn[None],))[0]

    def loss_n(flat: torch.Tensor, n: int) -> torch.Tensor:
        return F.cross_entropy(out(flat, x[n])[None], y[n:n + 1])

    N = len(y)
    peers.load_jvp_decompositions()  # torch.func.hessian's forward mode, without torch's own DeprecationWarning
    hess = sum(torch.func.hessian(loss_n)(theta, n) for n in range(N)) / N
    ggn, fisher = torch.zeros_like(hess), torch.zeros_like(hess)
    for n in range(N):
        jac = torch.func.jacrev(out)(theta, x[n])
        z = out(theta, x[n]).detach()
        hz = torch.func.hessian(lambda zz: F.cross_entropy(zz[None], y[n:n + 1]))(z)
        ggn += jac.T @ hz @ jac / N
        g = torch.func.grad(loss_n)(theta, n)
        fisher += torch.outer(g, g) / N
    u = torch.func.grad(lambda flat: sum(loss_n(flat, n) for n in range(N)) / N)(theta)
    cols = torch.zeros(len(u), len(sizes), dtype=u.dtype)
    for s, (lo, hi) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))):
        cols[lo:hi, s] = u[lo:hi]
    return {c: (cols.T @ m @ cols).numpy() for c, m in (("hessian", hess), ("ggn", ggn), ("fisher", fisher))}


def test_curvatures_suite_rows_on_a_tiny_model() -> None:
    """The curvatures suite's plumbing on a tiny float64 MLP in three unequal batches: one row per tool with the
    expected keys, curvscope's H̄, Ḡ, F̄ equal to Uᵀ C U from dense H, G, F; curvlinops' (where it imports) too."""
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(5,), out_features=3).double().eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (13,), generator=gen)
    batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    rows = curvature_rows("mlp", model, batches, repeat=1)
    ref = _dense_reference(model, batches)
    tools = ["curvscope H̄", "curvscope Ḡ", "curvscope F̄"]
    if peers.curvlinops_available():
        tools += ["curvlinops GGN", "curvlinops EF"]
    assert [r["tool"] for r in rows] == tools
    keys = {"model", "samples", "batch_size", "S", "P", "tool", "curvature", "seconds", "ratio_to_hbar",
            "ratio_to_curvlinops", "max_rel_diff", "max_rel_diff_float64", "error", "note", "pseudo_curvature"}
    for r in rows:
        assert keys <= set(r) and r["error"] is None
        assert (r["model"], r["samples"], r["batch_size"], r["S"], r["P"]) == ("mlp", 13, 5, 4, 53)
        np.testing.assert_allclose(np.array(r["pseudo_curvature"]), ref[r["curvature"]], rtol=1e-9, atol=1e-12)
        if r["tool"] in ("curvscope Ḡ", "curvscope F̄") and len(tools) == 5:
            assert r["max_rel_diff"] < 1e-10 and r["ratio_to_curvlinops"] > 0
        else:
            assert r["max_rel_diff"] is None and r["ratio_to_curvlinops"] is None
    assert rows[0]["ratio_to_hbar"] == 1.0
    table = curvatures_markdown(rows)
    assert all(f"| {t} |" in table for t in tools)


def test_peak_rss_sees_an_allocation() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    mem = peak_rss(lambda: np.ones(64 * 2**20 // 8).sum())
    assert mem["peak_rss_rise_mib"] > 48 and mem["rss_before_mib"] > 0
