"""The benchmark's helpers: tools take turns and each keeps its fastest result; peers free their copies; the
curvatures and K-FAC suites' rows and their peak-memory measure; the models suite's data, configurations, rows and
tables."""
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

from curvscope.curvature.spectrum import fitted_basis
from curvscope.sources.zoo import MLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import peers  # noqa: E402
from bench import (  # noqa: E402
    MODELS_SUITE,
    bench_models,
    calibrate_batchnorm,
    curvature_rows,
    curvatures_markdown,
    interleaved,
    kfac_markdown,
    kfac_references,
    kfac_rows,
    models_config,
    models_markdown,
    peak_rss,
    suite_models,
    token_data,
)
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


def _tiny_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def test_kfac_suite_is_exact_where_kfac_is() -> None:
    """One Linear layer on one sample: K-FAC is exact for the GGN and the empirical Fisher, so the suite's K̄ is C̄
    and, under Ḡ, both the layer-block step and K-FAC's are Newton's (e = 1)."""
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(), out_features=3).double().eval()
    x, y = _tiny_data(1)
    batches = [(x, y)]
    rows = kfac_rows("one", model, batches, repeat=1, flavours=["type-2", "empirical"])
    refs = kfac_references(model, batches, ["ggn", "fisher"])
    for r in (r for r in rows if r["tool"].startswith("curvscope")):
        np.testing.assert_allclose(np.array(r["kfac_pseudo_curvature"]), refs[r["curvature"]].cbar, rtol=1e-10,
                                   atol=1e-14)
    ggn = next(r for r in rows if r["tool"] == "curvscope K-FAC type-2")
    assert ggn["e_layer"] == pytest.approx(1.0, abs=1e-10) and ggn["e_kfac"] == pytest.approx(1.0, abs=1e-10)


def test_kfac_suite_rows_on_a_tiny_model() -> None:
    """The K-FAC suite's plumbing on a tiny float64 MLP in three unequal batches: one row per tool and flavour with
    the expected keys and phases; curvscope's K̄ equal to curvlinops' (where it imports) in every flavour, mc
    included (both draw the same labels from a generator seeded 0); the step efficiencies the same from either."""
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(5,), out_features=3).double().eval()
    x, y = _tiny_data(13)
    batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    flavours = ["type-2", "empirical", "mc"]
    rows = kfac_rows("mlp", model, batches, repeat=1, flavours=flavours, check_float64=True)
    tools = [f"curvscope K-FAC {f}" for f in flavours]
    if peers.curvlinops_available():
        tools += [f"curvlinops KFAC {f}" for f in flavours]
    assert [r["tool"] for r in rows] == tools
    keys = {"model", "samples", "batch_size", "S", "P", "tool", "flavour", "curvature", "seconds", "gradient_s",
            "factors_s", "projection_s", "ratio_to_curvlinops", "factors_ratio_to_curvlinops", "max_rel_diff",
            "max_rel_diff_float64", "q_star", "condition_number", "e_layer", "e_kfac", "error", "note",
            "kfac_pseudo_curvature"}
    by_tool = {r["tool"]: r for r in rows}
    for r in rows:
        assert keys <= set(r) and r["error"] is None
        assert (r["model"], r["samples"], r["batch_size"], r["S"], r["P"]) == ("mlp", 13, 5, 4, 53)
        assert r["gradient_s"] + r["factors_s"] + r["projection_s"] <= r["seconds"]
        assert np.isfinite(r["e_layer"]) and r["e_layer"] <= 1 + 1e-12
        if r["tool"].startswith("curvscope") and len(tools) == 6 and r["flavour"] == "mc":
            assert r["max_rel_diff"] > 1e-6  # different labels after the first batch (see kfac_notes)
        elif r["tool"].startswith("curvscope") and len(tools) == 6:
            peer = by_tool[f"curvlinops KFAC {r['flavour']}"]
            assert r["max_rel_diff"] < 1e-12 and r["max_rel_diff_float64"] < 1e-12 and r["ratio_to_curvlinops"] > 0
            assert r["e_kfac"] == pytest.approx(peer["e_kfac"], abs=1e-10)
        else:
            assert r["max_rel_diff"] is None and r["ratio_to_curvlinops"] is None
    table = kfac_markdown(rows)
    assert all(f"| {t} |" in table for t in tools)


def test_kfac_mc_draws_what_curvlinops_draws_on_one_batch() -> None:
    """On one batch both tools seed one generator with 0 and draw the same labels: K̄ agrees to round-off."""
    if not peers.curvlinops_available():
        pytest.skip("curvlinops is not installed (the bench extra)")
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(5,), out_features=3).double().eval()
    x, y = _tiny_data(13)
    rows = kfac_rows("mlp", model, [(x, y)], repeat=1, flavours=["mc"], check_float64=True)
    ours = next(r for r in rows if r["tool"].startswith("curvscope"))
    assert ours["max_rel_diff"] < 1e-12 and ours["max_rel_diff_float64"] < 1e-12


# --------------------------------------------------------------------------- models suite

def test_token_data_is_next_token_prediction() -> None:
    data = token_data(vocab_size=7, seq_len=5, n=4, seed=3)
    assert data.inputs.shape == data.targets.shape == (4, 5) and data.inputs.dtype == torch.int64
    assert torch.equal(data.inputs[:, 1:], data.targets[:, :-1])  # the target of step t is the input of t + 1
    assert 0 <= int(data.inputs.min()) and int(data.targets.max()) < 7
    assert torch.equal(token_data(vocab_size=7, seq_len=5, n=4, seed=3).inputs, data.inputs)
    assert not torch.equal(token_data("test", vocab_size=7, seq_len=5, n=4, seed=3).inputs, data.inputs)


def test_calibrate_batchnorm_sets_the_running_statistics_of_the_data() -> None:
    from curvscope.sources.zoo import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", {"width": 1})
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(8, 3, 8, 8) * 3 + 1
    assert calibrate_batchnorm(model, [(x[:4], None), (x[4:], None)])
    assert not model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        z = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert model.bn1.momentum == 0.1 and int(model.bn1.num_batches_tracked) == 2
    assert not calibrate_batchnorm(MLP(), [(torch.randn(2, 64), None)])


def test_models_suite_configurations() -> None:
    assert suite_models("models", None) == ["resnet18", "gpt2", "gpt2-1e8"]
    assert suite_models("models", ["lenet5", "gpt2"]) == ["gpt2"] and suite_models("kfac", ["gpt2"]) == []
    cfg = models_config("gpt2-1e8")
    assert cfg["model_kwargs"]["width"] == 768 and cfg["samples"] == 4 and cfg["rss_limit_gib"] == 20
    assert fitted_basis(103_200_000, cfg["top_k"], cfg["max_memory"]) == 14  # the basis the budget gives at P
    smoke = models_config("gpt2-1e8", smoke=True, overrides={"samples": 2})
    assert smoke["model_kwargs"]["width"] < 768 and smoke["samples"] == 2 and smoke["task"] == "spectra"
    assert {c["task"] for c in MODELS_SUITE.values()} == {"analyse", "spectra"}


TINY_LM = {"model_kwargs": {"vocab_size": 8, "context": 4, "width": 4, "depth": 1, "heads": 2},
           "data_kwargs": {"vocab_size": 8, "seq_len": 4, "n": 4}, "samples": 4, "batch_size": 2}


def test_models_suite_rows_on_tiny_models() -> None:
    """Both kinds of row in process on a tiny GPT-2: the default analyse's timings add up, its spectra made
    products; the spectra row's tasks and memory; the table marks smoke runs and failures."""
    analyse = bench_models("gpt2", smoke=True, overrides=TINY_LM, in_process=True)
    assert analyse["error"] is None and analyse["smoke"] and analyse["S"] == 16 and analyse["samples"] == 4
    assert analyse["P"] == 8 * 4 + 4 * 4 + 8 + 4 * 12 + 12 + 4 * 4 + 4 + 8 + 16 * 4 + 16 + 4 * 16 + 4 + 8
    assert analyse["products"] > 0 and analyse["top_converged"] == 5 and len(analyse["bottom"]) == 5
    parts = analyse["gradient_s"] + analyse["pseudo_s"] + analyse["spectrum_s"]
    assert 0 < parts <= analyse["total_s"] and analyse["rest_s"] >= 0
    if Path("/proc/self/clear_refs").exists():
        assert analyse["peak_rss_mib"] >= analyse["rss_before_mib"] > 0
    spectra = bench_models("gpt2-1e8", smoke=True, overrides={**TINY_LM, "lanczos_steps": 20, "slq_steps": 10,
                                                                 "trace_matvecs": 6}, in_process=True)
    assert spectra["error"] is None and spectra["P"] == analyse["P"]
    assert spectra["density_products"] == 10 and spectra["trace_products"] == 6
    assert spectra["products"] == sum(spectra[f"{t}_products"] for t in ("largest", "smallest", "trace", "density"))
    assert spectra["top"][0] >= spectra["top"][-1] and spectra["bottom"][0] <= spectra["bottom"][-1]
    failed = {"model": "resnet18", "task": "analyse", "smoke": False, "error": "killed by signal 9 (out of memory?)"}
    table = models_markdown([analyse, spectra, failed])
    assert "**Smoke run**" in table and "| gpt2 (smoke) |" in table and "| gpt2-1e8 (smoke) |" in table
    assert "| resnet18 |" in table and "killed by signal 9" in table
