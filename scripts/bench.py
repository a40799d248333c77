#!/usr/bin/env python
"""Benchmark curvscope against the hand-written alternative and the peer libraries, in one run.

Pseudo-Hessian suite (issue #2), CIFAR-shaped inputs (3x32x32, seeded N(0,1),
10 classes), float32, the paper's initialisation:
  - LeNet-5, N = 1024 samples in batches of 256;
  - VGG-11', N = 256 samples in batches of 64.
Timed: one gradient pass over the data; the hand-written loop (gradient pass,
then per batch one double-backward graph kept and S full Hessian-vector
products H U_s); curvscope's `pseudo_hessian` (gradient pass included). The
ratio is curvscope / hand-written (below 1 is faster). Both results are
compared entrywise (max relative difference) so a fast wrong answer shows.

Spectrum suite (issue #3), one batch (LeNet-5: 256 samples, VGG-11': 64):
top-5 Hessian eigenvalues and an SLQ density (1 run x 100 steps) by curvscope,
hessian-eigenthings (Lanczos, 40 steps) and PyHessian (power iteration), each
timed and compared with an exact reference (scipy eigsh, ncv 40: tol 1e-8 on
float64 Hessian-vector products for LeNet-5, tol 1e-6 on float32 ones for VGG-11'). Needs the peers:
pip install -e ".[bench]" && bash scripts/install_bench_peers.sh (the script installs them without
their dependencies, so that torch stays as it is).

    python scripts/bench.py                          # both suites, both models, writes reports/bench/
    python scripts/bench.py --suites spectrum --models lenet5

Curvatures suite (issue #14), the pseudo-Hessian suite's models and data, loss
`cross_entropy` on the log-softmax outputs (the softmax GGN): curvscope's H̄, Ḡ
and F̄ (`pseudo_hessian(curvature=...)`, gradient pass included) and curvlinops'
GGNLinearOperator / EFLinearOperator applied to the S columns of U (gradient pass,
`op @ U_cols`, U_colsᵀ(op @ U_cols) included), all taking turns in every round after
a one-batch warm-up. Ḡ and F̄ are compared with curvlinops' (max |difference| over
max |entry|). Peak memory: each tool once more in a fresh process (`--probe`), the
rise of its peak resident set (VmHWM, reset just before the call) over its resident
set before the call. Needs the peers: bash scripts/install_bench_peers.sh.

K-FAC suite (issue #15), the curvatures suite's models, data and loss: K̄ = UᵀKU on the canonical partition
for the flavours type-2 (K of Ḡ), empirical (K of F̄) and mc (K of Ḡ, one label drawn per sample, seed 0), by
curvscope (`curvature_operator`, `full_gradient`, `kfac`, `KFAC.projection`) and by curvlinops'
KFACLinearOperator (kfac_approx "expand", separate_weight_and_bias=False: the bias in A, as curvscope has it;
gradient_and_loss(), compute_kronecker_factors(), then U_colsᵀ(K @ U_cols)), all taking turns in every round
after a one-batch warm-up. Each run is timed in three phases: the gradient pass (with the operator's set-up),
the factor pass, and K̄'s projection; "total" is all of it, as in the curvatures suite. K̄ is compared with
curvlinops' (max |difference| over max |curvscope's entry|; --check-float64: again with everything in
float64), and peak memory is probed as in the curvatures suite. From curvscope's ḡ and C̄ (Ḡ or F̄, untimed),
the step efficiencies e = q(η)/q* of the layer-block step (B_layer C̄)⁻¹ḡ and of K-FAC's K̄⁺ḡ, with
q(η) = ḡᵀη − ½ηᵀC̄η and q* = q(C̄⁻¹ḡ).

    python scripts/bench.py --suites kfac --check-float64 --repeat 3 --models lenet5

Models suite (issue #16), each model in a fresh process (so that the peak resident set, VmHWM, is its own):
  - resnet18 (ResNet-18 with torchvision's 7x7 stem and max pooling, width 64, S = 62, P = 11.2 M; synthetic 3x32x32
    inputs, BatchNorm statistics calibrated on them) and gpt2 (2 layers, width 128, vocab 512, T = 64, S = 28, P =
    0.47 M; uniform random tokens from the data plug-in bench:token_data), N = 64 in batches of 32: the default
    `curvscope analyse` (analyse_checkpoint on a bundle, the data named as with --data), timed in total and split
    into the gradient pass, H̄, the spectra and the rest, with the spectra's Hessian-vector products and the peak
    resident set;
  - gpt2-1e8 (GPT-2 small's widths and vocabulary, 9 layers: P = 103.2 M; N = 4 sequences of T = 64 tokens): one
    Hessian operator, then top-5 at both ends, a Hutch++ trace and an SLQ density (1 run), each timed with its
    products, and the process's peak resident set against 20 GiB. Lanczos vectors are float64, 0.77 GiB each at
    this size: the operator's max_memory of 12 GiB sets the restarted basis (14), and SLQ keeps no basis
    (keywords the API does not take, in eigen_kwargs or density_kwargs, are reported in the row's note).
--smoke runs tiny configurations instead (rows marked as smoke runs: they check that the suite runs, they are not
results); --models-config '{"gpt2-1e8": {"samples": 4}}' replaces entries of a configuration (see MODELS_SUITE);
--device cuda runs the models suite on a GPU (its peak memory there is reported too).

    python scripts/bench.py --suites models --threads 2                  # all three (hours on 2 CPU cores)
    python scripts/bench.py --suites models --models gpt2-1e8 --merge   # the large spectra alone
    python scripts/bench.py --suites models --smoke --out /tmp/smoke     # a minute: does it run?

Timings are the best of --repeat runs: the pseudo-Hessian suite's after one
warm-up batch; the spectrum suite's tools take turns in every round, so that a
slow spell of a shared machine hits them alike. torch uses --threads threads
(default: all cores).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from curvscope import __version__, eigenvalues, pseudo_hessian, spectral_density
from curvscope.curvature.defaults import DEFAULT_MAX_MEMORY
from curvscope.curvature.partition import trainable
from curvscope.sources.losses import build_loss
from curvscope.sources.zoo import build_model

SETTINGS = {"lenet5": {"samples": 1024, "batch_size": 256}, "vgg11": {"samples": 256, "batch_size": 64}}
# float64 Hessian-vector products of VGG-11' take 10 s each on a 2-core CPU (1.5 s in float32), too slow
# for ARPACK; its reference uses float32 products, for which ARPACK cannot reach tol 1e-8: tol 1e-6,
# so VGG-11' errors below about 1e-6 are not resolved.
REFERENCE_DTYPE = {"lenet5": torch.float64, "vgg11": torch.float32}
REFERENCE_TOL = {"lenet5": 1e-8, "vgg11": 1e-6}


def cifar_shaped(n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n seeded N(0,1) 3x32x32 inputs with labels in 0..9, in batches."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def gradient_pass(model: torch.nn.Module, loss_fn: Callable, batches: list) -> list[torch.Tensor]:
    """g = Σ_b (n_b/N) ∇L_b, one backward per batch."""
    params = [p for _, p in trainable(model)]
    n = sum(len(y) for _, y in batches)
    grad = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for acc, g in zip(grad, torch.autograd.grad(loss_fn(model(x), y), params)):
            acc.add_(g, alpha=len(y) / n)
    return grad


def hand_written(model: torch.nn.Module, loss_fn: Callable, batches: list) -> np.ndarray:
    """The straightforward H̄: per batch one graph kept, S full products H U_s, then U_tᵀ(H U_s)."""
    params = [p for _, p in trainable(model)]
    u = gradient_pass(model, loss_fn, batches)
    S, n = len(params), sum(len(y) for _, y in batches)
    hbar = np.zeros((S, S))
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        for s in range(S):
            outs = [u[s] if t == s else torch.zeros_like(u[t]) for t in range(S)]
            hv = torch.autograd.grad(grads, params, grad_outputs=outs, retain_graph=True)
            hbar[:, s] += len(y) / n * np.array([float((h * ut).sum()) for h, ut in zip(hv, u)])
    return 0.5 * (hbar + hbar.T)


def timed(fn: Callable[[], object]) -> Callable[[], SimpleNamespace]:
    """`fn` timed, shaped like a peer's result (`.seconds`, `.result`)."""
    def run() -> SimpleNamespace:
        start = time.perf_counter()
        out = fn()
        return SimpleNamespace(seconds=time.perf_counter() - start, result=out)
    return run


def interleaved(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, object]:
    """The fastest of `repeat` results of each run (by `.seconds`), the runs taking turns in every round so
    that a slow spell of a shared machine hits every tool alike."""
    best: dict[str, object] = {}
    for _ in range(repeat):
        for tool, fn in runs.items():
            out = fn()
            if tool not in best or out.seconds < best[tool].seconds:
                best[tool] = out
    return best


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """The best time of `repeat` calls of `fn`, and the result of that call."""
    best = interleaved({"": timed(fn)}, repeat)[""]
    return best.seconds, best.result


def bench_pseudo_hessian(name: str, repeat: int, strategies: list[str]) -> dict:
    torch.manual_seed(0)
    model = build_model(name).eval()
    loss_fn = build_loss("nll")
    cfg = SETTINGS[name]
    batches = cifar_shaped(cfg["samples"], cfg["batch_size"])
    hand_written(model, loss_fn, batches[:1])  # warm-up
    t_grad, _ = best_time(lambda: gradient_pass(model, loss_fn, batches), repeat)
    t_hand, ref = best_time(lambda: hand_written(model, loss_fn, batches), repeat)
    row = {"model": name, **cfg, "S": len(trainable(model)), "gradient_pass_s": t_grad, "hand_written_s": t_hand}
    for strategy in strategies:
        t, res = best_time(lambda: pseudo_hessian(model, loss_fn, batches, strategy=strategy), repeat)
        err = float(np.max(np.abs(res.pseudo_hessian - ref)) / np.max(np.abs(ref)))
        row[f"curvscope_{strategy}_s"] = t
        row[f"ratio_{strategy}"] = t / t_hand
        row[f"max_rel_diff_{strategy}"] = err
    return row


def markdown(rows: list[dict], strategies: list[str]) -> str:
    head = ["model", "N", "B", "S", "gradient pass", "hand-written loop"]
    head += [f"curvscope ({s})" for s in strategies] + [f"ratio ({s})" for s in strategies]
    head += ["max rel. diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["samples"]), str(r["batch_size"]), str(r["S"]), f"{r['gradient_pass_s']:.2f} s",
                 f"{r['hand_written_s']:.2f} s"]
        cells += [f"{r[f'curvscope_{s}_s']:.2f} s" for s in strategies]
        cells += [f"**{r[f'ratio_{s}']:.2f}x**" for s in strategies]
        cells += [f"{max(r[f'max_rel_diff_{s}'] for s in strategies):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rel_error(values: np.ndarray | None, ref: np.ndarray) -> float:
    if values is None or len(values) < len(ref):
        return float("nan")
    return float(np.max(np.abs(np.asarray(values)[:len(ref)] - ref) / np.abs(ref)))


def bench_spectrum(name: str, repeat: int) -> list[dict]:
    """Top-5 and SLQ density by curvscope and the peers on one batch, against eigsh in float64."""
    import peers  # scripts/peers.py: the peer libraries, imported only for this suite

    torch.manual_seed(0)
    model = build_model(name).eval()
    loss_fn = build_loss("nll")
    (x, y), = cifar_shaped(SETTINGS[name]["batch_size"], SETTINGS[name]["batch_size"])
    start = time.perf_counter()
    ref = peers.exact_top_k(model, loss_fn, x, y, k=5, tol=REFERENCE_TOL[name], dtype=REFERENCE_DTYPE[name])
    t_ref = time.perf_counter() - start
    ref_name = f"reference ({str(REFERENCE_DTYPE[name]).removeprefix('torch.')} eigsh, tol {REFERENCE_TOL[name]:g})"
    rows = [{"model": name, "task": "top-5", "tool": ref_name, "seconds": t_ref,
             "rel_error": 0.0, "values": ref.tolist(), "note": ""}]
    top = interleaved({"curvscope": timed(lambda: eigenvalues(model, loss_fn, [(x, y)], k=5)),
                       "hessian-eigenthings": lambda: peers.eigenthings_top_k(model, loss_fn, x, y, k=5),
                       "PyHessian": lambda: peers.pyhessian_top_k(model, loss_fn, x, y, k=5)}, repeat)
    ours = top.pop("curvscope")
    rows.append({"model": name, "task": "top-5", "tool": "curvscope", "seconds": ours.seconds,
                 "rel_error": _rel_error(ours.result.values, ref), "values": ours.result.values.tolist(),
                 "note": f"{ours.result.steps} Lanczos steps (check run included), "
                         f"converged {int(ours.result.converged.sum())}/5, verified {ours.result.verified}"})
    for tool, res in top.items():
        rows.append({"model": name, "task": "top-5", "tool": tool, "seconds": res.seconds,
                     "rel_error": _rel_error(res.values, ref), "values": None if res.values is None else
                     res.values.tolist(), "note": res.error or res.note})
    density = interleaved(
        {"curvscope": timed(lambda: spectral_density(model, loss_fn, [(x, y)], runs=1, steps=100)),
         "hessian-eigenthings": lambda: peers.eigenthings_density(model, loss_fn, x, y, runs=1, steps=100),
         "PyHessian": lambda: peers.pyhessian_density(model, loss_fn, x, y, runs=1, steps=100)}, repeat)
    ours = density.pop("curvscope")
    nodes = ours.result.nodes
    rows.append({"model": name, "task": "density 1x100", "tool": "curvscope", "seconds": ours.seconds,
                 "rel_error": _rel_error(np.sort(nodes[np.isfinite(nodes)])[::-1], ref),
                 "values": None, "note": "rel. error: its top 5 nodes against the reference"})
    for tool, res in density.items():
        rows.append({"model": name, "task": "density 1x100", "tool": tool, "seconds": res.seconds,
                     "rel_error": _rel_error(res.values, ref), "values": None,
                     "note": res.error or "rel. error: its top 5 nodes against the reference"})
    return rows


def spectrum_markdown(rows: list[dict]) -> str:
    lines = ["| model | task | tool | time | time / hessian-eigenthings | max rel. error of top 5 | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = next((q["seconds"] for q in rows if q["model"] == r["model"] and q["task"] == r["task"]
                     and q["tool"] == "hessian-eigenthings"), float("nan"))
        ratio = "" if r["tool"].startswith("reference") else f"{r['seconds'] / peer:.2f}x"
        err = "failed" if r["note"].startswith(("RuntimeError", "Error")) else f"{r['rel_error']:.1e}"
        lines.append(f"| {r['model']} | {r['task']} | {r['tool']} | {r['seconds']:.2f} s | {ratio} | {err} | "
                     f"{r['note'][:120]} |")
    return "\n".join(lines)


CURVATURES = {"hessian": "H̄", "ggn": "Ḡ", "fisher": "F̄"}
PEER_NAMES = {"ggn": "GGN", "fisher": "EF"}


def curvature_tools(model: torch.nn.Module, batches: list) -> dict[str, tuple[str, Callable[[], SimpleNamespace]]]:
    """tool -> (curvature, run); a run returns `.seconds`, `.values` (C̄, S x S float64 or None), `.error`,
    `.note`. curvlinops' tools are there only when it imports."""
    import peers  # scripts/peers.py

    loss_fn = build_loss("cross_entropy")

    def ours(curvature: str) -> Callable[[], SimpleNamespace]:
        def run() -> SimpleNamespace:
            out = timed(lambda: pseudo_hessian(model, loss_fn, batches, curvature=curvature).pseudo_hessian)()
            return SimpleNamespace(seconds=out.seconds, values=out.result, error=None,
                                   note="pseudo_hessian(curvature=%r), gradient pass included" % curvature)
        return run

    tools = {f"curvscope {sym}": (c, ours(c)) for c, sym in CURVATURES.items()}
    if peers.curvlinops_available():
        for c, peer in PEER_NAMES.items():
            tools[f"curvlinops {peer}"] = (c, lambda c=c: peers.curvlinops_pseudo_curvature(model, batches, c))
    return tools


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss(fn: Callable[[], object]) -> dict:
    """Call `fn` once; the rise of this process's peak resident set during the call over its resident set just
    before it, in MiB (Linux: VmHWM, reset through /proc/self/clear_refs; NaN where that is not possible)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except (OSError, StopIteration):
        fn()
        return {"peak_rss_rise_mib": float("nan"), "rss_before_mib": float("nan")}
    fn()
    return {"peak_rss_rise_mib": (_status_kib("VmHWM") - before) / 1024, "rss_before_mib": before / 1024}


def curvature_setup(name: str) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    cfg = SETTINGS[name]
    return build_model(name).eval(), cifar_shaped(cfg["samples"], cfg["batch_size"])


def probe_memory(name: str, tool: str) -> dict:
    """The peak memory of one run of `tool` on `name`, in a fresh process (see `peak_rss`)."""
    cmd = [sys.executable, __file__, "--probe", name, tool, "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"peak_rss_rise_mib": float("nan"), "rss_before_mib": float("nan"),
                "probe_error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def curvature_rows(name: str, model: torch.nn.Module, batches: list, repeat: int,
                   memory: Callable[[str], dict] | None = None, check_float64: bool = False) -> list[dict]:
    """One row per tool: its best time of `repeat` interleaved rounds (after a one-batch warm-up), the ratios to
    curvscope's H̄ and to curvlinops' operator for the same curvature, the max relative difference of C̄ from
    curvlinops' (max |difference| / max |entry|), and `memory(tool)`'s peak memory where given."""
    for _, run in curvature_tools(model, batches[:1]).values():  # warm-up
        run()
    tools = curvature_tools(model, batches)
    best = interleaved({tool: run for tool, (_, run) in tools.items()}, repeat)
    peer_of = {c: f"curvlinops {p}" for c, p in PEER_NAMES.items()}
    t_h = best["curvscope H̄"].seconds
    ref64 = {}
    if check_float64 and all(t in best for t in peer_of.values()):
        ref64 = float64_agreement(model, batches)
    rows = []
    for tool, out in best.items():
        curvature = tools[tool][0]
        peer = best.get(peer_of.get(curvature, ""))
        ours = tool.startswith("curvscope") and peer is not None and curvature in peer_of
        rows.append({
            "model": name, "samples": sum(len(y) for _, y in batches), "batch_size": len(batches[0][1]),
            "S": len(trainable(model)), "P": sum(p.numel() for _, p in trainable(model)), "tool": tool,
            "curvature": curvature, "seconds": out.seconds, "ratio_to_hbar": out.seconds / t_h,
            "ratio_to_curvlinops": out.seconds / peer.seconds if ours and peer.error is None else None,
            "max_rel_diff": _max_rel_diff(out.values, peer.values) if ours else None,
            "max_rel_diff_float64": ref64.get(curvature) if ours else None,
            **(memory(tool) if memory else {}),
            "error": out.error, "note": out.note,
            "pseudo_curvature": None if out.values is None else np.asarray(out.values).tolist()})
    return rows


def _max_rel_diff(a: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    if a is None or ref is None:
        return None
    return float(np.max(np.abs(np.asarray(a) - ref)) / np.max(np.abs(ref)))


def float64_agreement(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """Untimed: the max relative difference of curvscope's Ḡ and F̄ from curvlinops' with everything in float64."""
    import peers

    model64 = peers._fresh(model, torch.float64)
    batches64 = [(x.double(), y) for x, y in batches]
    loss_fn = build_loss("cross_entropy")
    out = {}
    for c in PEER_NAMES:
        ours = pseudo_hessian(model64, loss_fn, batches64, curvature=c).pseudo_hessian
        out[c] = _max_rel_diff(ours, peers.curvlinops_pseudo_curvature(model64, batches64, c).values)
    return out


def bench_curvatures(name: str, repeat: int, memory: bool = True, check_float64: bool = False) -> list[dict]:
    model, batches = curvature_setup(name)
    return curvature_rows(name, model, batches, repeat, (lambda tool: probe_memory(name, tool)) if memory else None,
                          check_float64)


def _probe(name: str, tool: str) -> None:
    """`--probe`: print `peak_rss` of one run of `tool` on `name` as JSON. What loads on first use (curvscope's
    modules, curvlinops, torch.func's forward-mode decompositions) is loaded before the baseline; no warm-up run,
    whose freed buffers the allocator could keep and hand back, hiding part of the peak."""
    import peers

    import curvscope.curvature.fisher  # noqa: F401
    import curvscope.curvature.ggn  # noqa: F401
    import curvscope.curvature.hessian  # noqa: F401
    import curvscope.curvature.kfac  # noqa: F401
    import curvscope.curvature.registry  # noqa: F401

    model, batches = curvature_setup(name)
    tools = curvature_tools(model, batches)  # imports curvlinops where it is installed
    if tool not in tools:  # the K-FAC suite's (curvlinops' model copy made here, before the baseline)
        tools = kfac_tools(model, batches, [next(f for f in KFAC_FLAVOURS if tool.endswith(" " + f))])
    run = tools[tool][1]
    peers.load_jvp_decompositions()
    print(json.dumps(peak_rss(run)))


def peer_cells(r: dict) -> tuple[str, str, str]:
    """A row's ratio to curvlinops, its agreement with curvlinops (and in float64) and its peak memory, as cells."""
    ratio = "" if r["ratio_to_curvlinops"] is None else f"**{r['ratio_to_curvlinops']:.2f}x**"
    diff = "" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
    if r.get("max_rel_diff_float64") is not None:
        diff += f" (float64: {r['max_rel_diff_float64']:.1e})"
    mem = f"{r['peak_rss_rise_mib']:.0f} MiB" if np.isfinite(r.get("peak_rss_rise_mib", np.nan)) else "n/a"
    return ratio, diff, mem


def run_footer(rows: list[dict]) -> list[str]:
    """One line per model: how many interleaved rounds, when and on what machine."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        r = next(q for q in rows if q["model"] == name)
        if "date" in r:
            lines.append(f"- {name}: best of {r['repeat']} interleaved round(s), {r['date']}, {r['machine']}.")
    return lines


def curvatures_markdown(rows: list[dict]) -> str:
    lines = ["| model | N | B | S | tool | time | / curvscope H̄ | / curvlinops | max rel. diff vs curvlinops | "
             "peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio, diff, mem = peer_cells(r)
        time_s = "failed" if r["error"] else f"{r['seconds']:.2f} s"
        lines.append(f"| {r['model']} | {r['samples']} | {r['batch_size']} | {r['S']} | {r['tool']} | {time_s} | "
                     f"{r['ratio_to_hbar']:.2f}x | {ratio} | {diff} | {mem} |")
    lines += ["", "Targets (issue #14):", "", *curvature_targets(rows), ""]
    return "\n".join(lines + run_footer(rows))


def curvature_targets(rows: list[dict]) -> list[str]:
    """Issue #14's targets: Ḡ and F̄ each at most 0.25x H̄'s time and at most 0.2x curvlinops' GGN on U's columns."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        t = {r["tool"]: r["seconds"] for r in rows if r["model"] == name and not r["error"]}
        for sym, peer in (("Ḡ", "GGN"), ("F̄", "EF")):
            ours = t.get(f"curvscope {sym}")
            for ref, target in (("curvscope H̄", 0.25), ("curvlinops GGN", 0.2), (f"curvlinops {peer}", None)):
                if ours is None or ref not in t or (target is None and peer == "GGN"):
                    continue
                ratio = ours / t[ref]
                if target is None:  # F̄ against curvlinops' own empirical Fisher: no target, for information
                    out.append(f"- {name}: {sym} / {ref} = {ratio:.3f} (no target)")
                    continue
                verdict = "met" if ratio <= target else f"**not met**: {ratio / target:.2f}x the target"
                out.append(f"- {name}: {sym} / {ref} = {ratio:.3f} (target <= {target}): {verdict}")
    return out


# --------------------------------------------------------------------------- K-FAC suite

#: flavour -> the curvature it approximates (the operator curvscope builds its factors on; mc samples the GGN's
#: Fisher form, so it is measured against Ḡ)
KFAC_FLAVOURS = {"type-2": "ggn", "empirical": "fisher", "mc": "ggn"}
KFAC_PHASES = ("gradient", "factors", "projection")


def _phased(body: Callable[[Callable[[str], None]], tuple[np.ndarray, str]], catch: bool
            ) -> Callable[[], SimpleNamespace]:
    """A run of `body(mark)`, which calls `mark(phase)` at the end of each phase and returns (K̄, note): `.seconds`
    (all of it), `.phases` (seconds per phase), `.values`, `.error` (a peer's exception in one line, when `catch`)
    and `.note`."""
    def run() -> SimpleNamespace:
        phases: dict[str, float] = {}
        start = last = time.perf_counter()

        def mark(phase: str) -> None:
            nonlocal last
            now = time.perf_counter()
            phases[phase], last = now - last, now

        try:
            (values, note), error = body(mark), None
        except Exception as exc:  # noqa: BLE001 - peers fail in many ways; report, don't raise
            if not catch:
                raise
            import peers

            values, note, error = None, "failed", peers._one_line(exc)
        return SimpleNamespace(seconds=time.perf_counter() - start, phases=phases, values=values, error=error,
                               note=note)
    return run


def curvscope_kfac(model: torch.nn.Module, batches: list, flavour: str) -> Callable[[], SimpleNamespace]:
    """curvscope's K̄ of `flavour` (see `_phased`): the operator of the curvature the flavour approximates, the
    gradient pass, the factors (`kfac`), then K̄ (`KFAC.projection` on the canonical partition). C̄, which K̄ needs
    only for tensors without a K-FAC rule, is computed (in the K̄ phase) only when there are some."""
    from curvscope.curvature.kfac import kfac
    from curvscope.curvature.operator import full_gradient
    from curvscope.curvature.partition import make_partition
    from curvscope.curvature.registry import curvature_operator

    loss_fn = build_loss("cross_entropy")

    def body(mark: Callable[[str], None]) -> tuple[np.ndarray, str]:
        with curvature_operator(model, loss_fn, batches, KFAC_FLAVOURS[flavour]) as op:
            gradient = full_gradient(op.obj, op.params)
            mark("gradient")
            factors = kfac(op, flavour, approximation="expand", mc_samples=1, seed=0)
            mark("factors")
            part = make_partition(op.obj.model)
            exact = (op.projection(part, gradient=gradient).pseudo_hessian if factors.exact
                     else np.zeros((part.size, part.size)))
            kbar, _ = factors.projection(part, gradient[0], exact)
            mark("projection")
        return kbar, (f"kfac(op, {flavour!r}) on the {KFAC_FLAVOURS[flavour]} operator, then "
                      f"KFAC.projection; gradient pass included" + (f"; C̄ for {len(factors.exact)} exact tensors"
                                                                    if factors.exact else ""))
    return _phased(body, catch=False)


def curvlinops_kfac(model: torch.nn.Module, batches: list, flavour: str, seed: int = 0
                    ) -> Callable[[], SimpleNamespace]:
    """curvlinops' K̄ of `flavour` (see `_phased`) on a copy of the model made now, outside the run:
    `KFACLinearOperator(fisher_type=flavour, kfac_approx="expand", separate_weight_and_bias=False)` with
    `CrossEntropyLoss(reduction="mean")` (our loss is cross_entropy on log-softmax outputs, the same value, and the
    same K-FAC: log-softmax's Jacobian drops out of the softmax's output Hessian, and the gradients are equal),
    `num_data`, `num_per_example_loss_terms=1` and `check_deterministic=False` given so that the constructor makes
    no pass over the data; `gradient_and_loss()`; `compute_kronecker_factors()`; then U_cols (P x S), `K @ U_cols`
    and U_colsᵀ (K @ U_cols) in float64 from the model-dtype product, as in the curvatures suite.
    `separate_weight_and_bias=False` puts the bias in A as curvscope does (A_l of [ã; 1]); curvlinops' default
    (True) gives the bias its own 1 ⊗ B_l block, dropping the weight-bias entries of K̄."""
    import curvlinops
    import peers

    peers.load_jvp_decompositions()
    net = peers._fresh(model)
    params = [p for p in net.parameters() if p.requires_grad]
    n = sum(len(y) for _, y in batches)

    def body(mark: Callable[[str], None]) -> tuple[np.ndarray, str]:
        op = curvlinops.KFACLinearOperator(net, torch.nn.CrossEntropyLoss(reduction="mean"), params, batches,
                                           check_deterministic=False, seed=seed, fisher_type=flavour, mc_samples=1,
                                           kfac_approx="expand", num_per_example_loss_terms=1,
                                           separate_weight_and_bias=False, num_data=n)
        grad, _loss = op.gradient_and_loss()
        mark("gradient")
        op.compute_kronecker_factors()
        mark("factors")
        offsets = np.cumsum([0, *(p.numel() for p in params)])
        u_cols = torch.zeros(offsets[-1], len(params), dtype=grad[0].dtype)
        for s, g in enumerate(grad):
            u_cols[offsets[s]:offsets[s + 1], s] = g.reshape(-1)
        ku = op @ u_cols
        kbar = torch.stack([g.reshape(-1).double() @ ku[offsets[t]:offsets[t + 1]].double()
                            for t, g in enumerate(grad)]).numpy()
        mark("projection")
        return 0.5 * (kbar + kbar.T), (f"KFACLinearOperator({flavour}, expand, joint weight and bias) @ U_cols "
                                       f"({offsets[-1]} x {len(params)}, {u_cols.dtype}), gradient_and_loss() "
                                       f"included")

    run = _phased(body, catch=True)

    def run_and_clean() -> SimpleNamespace:
        out = run()
        peers._drop_grads(net)
        return out
    return run_and_clean


def kfac_tools(model: torch.nn.Module, batches: list, flavours: list[str]
               ) -> dict[str, tuple[str, Callable[[], SimpleNamespace]]]:
    """tool -> (flavour, run) for curvscope's K-FAC and, where it imports, curvlinops', per flavour."""
    import peers

    tools = {f"curvscope K-FAC {f}": (f, curvscope_kfac(model, batches, f)) for f in flavours}
    if peers.curvlinops_available():
        tools.update({f"curvlinops KFAC {f}": (f, curvlinops_kfac(model, batches, f)) for f in flavours})
    return tools


def step_efficiency(gbar: np.ndarray, cbar: np.ndarray, layers: np.ndarray, kbar: np.ndarray | None) -> dict:
    """q* = q(η*), C̄'s condition number and the efficiencies e = q(η)/q* of the layer-block step
    η_layer = (B_layer C̄)⁻¹ ḡ and of K-FAC's η_K = K̄⁺ ḡ, under q(η) = ḡᵀη − ½ ηᵀC̄η and η* = C̄⁻¹ḡ (pseudo-inverses:
    a zero-gradient group makes C̄ singular). The efficiencies are NaN unless C̄ is positive definite (q* is then
    not the maximum)."""
    def q(eta: np.ndarray) -> float:
        return float(gbar @ eta - 0.5 * eta @ cbar @ eta)

    q_star = q(np.linalg.pinv(cbar, hermitian=True) @ gbar)
    lam = np.linalg.eigvalsh(cbar)
    ok = bool(lam.min() > 0 and q_star > 0)
    same = layers[:, None] == layers[None, :]
    e_layer = q(np.linalg.pinv(np.where(same, cbar, 0.0), hermitian=True) @ gbar) / q_star if ok else float("nan")
    e_kfac = (q(np.linalg.pinv(kbar, hermitian=True) @ gbar) / q_star if ok and kbar is not None
              and np.isfinite(kbar).all() else float("nan"))
    return {"q_star": q_star, "condition_number": float(lam.max() / lam.min()) if ok else float("inf"),
            "e_layer": e_layer, "e_kfac": e_kfac}


def kfac_references(model: torch.nn.Module, batches: list, curvatures: list[str]) -> dict[str, SimpleNamespace]:
    """Untimed, per curvature: ḡ, C̄ (curvscope's, canonical partition) and each group's layer."""
    from curvscope.curvature.partition import make_partition
    from curvscope.curvature.registry import curvature_operator

    out = {}
    for c in curvatures:
        with curvature_operator(model, build_loss("cross_entropy"), batches, c) as op:
            part = make_partition(op.obj.model)
            res = op.projection(part)
        out[c] = SimpleNamespace(gbar=res.pseudo_gradient, cbar=res.pseudo_hessian, layers=np.asarray(part.layers))
    return out


def kfac_float64_agreement(model: torch.nn.Module, batches: list, flavours: list[str]) -> dict[str, float]:
    """Untimed: max |K̄_curvscope − K̄_curvlinops| / max |K̄_curvscope| with everything in float64, per flavour."""
    import peers

    model64 = peers._fresh(model, torch.float64)
    batches64 = [(x.double(), y) for x, y in batches]
    out = {}
    for f in flavours:
        ours = curvscope_kfac(model64, batches64, f)().values
        peer = curvlinops_kfac(model64, batches64, f)()
        out[f] = _max_rel_diff(peer.values, ours) if peer.error is None else float("nan")
    return out


def kfac_rows(name: str, model: torch.nn.Module, batches: list, repeat: int, flavours: list[str],
              memory: Callable[[str], dict] | None = None, check_float64: bool = False) -> list[dict]:
    """One row per tool and flavour: its best total time of `repeat` interleaved rounds (after a one-batch warm-up)
    and that run's phases, the ratio to curvlinops' for the same flavour, K̄'s max relative difference from
    curvlinops' (max |difference| / max |curvscope's entry|), the step efficiencies from its K̄ and curvscope's ḡ
    and C̄, and `memory(tool)`'s peak memory where given."""
    for _, run in kfac_tools(model, batches[:1], flavours).values():  # warm-up
        run()
    tools = kfac_tools(model, batches, flavours)
    best = interleaved({tool: run for tool, (_, run) in tools.items()}, repeat)
    peer_of = {f: f"curvlinops KFAC {f}" for f in flavours}
    ref64 = kfac_float64_agreement(model, batches, flavours) if check_float64 and peer_of[flavours[0]] in best else {}
    refs = kfac_references(model, batches, list(dict.fromkeys(KFAC_FLAVOURS[f] for f in flavours)))
    rows = []
    for tool, out in best.items():
        flavour = tools[tool][0]
        curvature = KFAC_FLAVOURS[flavour]
        peer = best.get(peer_of[flavour])
        ours = tool.startswith("curvscope") and peer is not None and peer.error is None
        ref = refs[curvature]
        rows.append({
            "model": name, "samples": sum(len(y) for _, y in batches), "batch_size": len(batches[0][1]),
            "S": len(trainable(model)), "P": sum(p.numel() for _, p in trainable(model)), "tool": tool,
            "flavour": flavour, "curvature": curvature, "seconds": out.seconds,
            **{f"{phase}_s": out.phases.get(phase, float("nan")) for phase in KFAC_PHASES},
            "ratio_to_curvlinops": out.seconds / peer.seconds if ours else None,
            "factors_ratio_to_curvlinops": out.phases["factors"] / peer.phases["factors"] if ours else None,
            "max_rel_diff": _max_rel_diff(peer.values, out.values) if ours else None,
            "max_rel_diff_float64": ref64.get(flavour) if ours else None,
            **step_efficiency(ref.gbar, ref.cbar, ref.layers, None if out.values is None else np.asarray(out.values)),
            **(memory(tool) if memory else {}),
            "error": out.error, "note": out.note,
            "kfac_pseudo_curvature": None if out.values is None else np.asarray(out.values).tolist()})
    return rows


def bench_kfac(name: str, repeat: int, flavours: list[str], memory: bool = True, check_float64: bool = False
               ) -> list[dict]:
    model, batches = curvature_setup(name)
    probe = (lambda tool: probe_memory(name, tool)) if memory else None
    return kfac_rows(name, model, batches, repeat, flavours, probe, check_float64)


def kfac_markdown(rows: list[dict]) -> str:
    lines = ["| model | N | B | S | flavour | tool | gradient pass | factors | K̄ projection | total | / curvlinops | "
             "max rel. diff vs curvlinops | peak memory |", "|" + "---|" * 13]
    for r in rows:
        ratio, diff, mem = peer_cells(r)
        keys = [f"{p}_s" for p in KFAC_PHASES] + ["seconds"]
        phases = ["failed" if r["error"] else f"{r[key]:.2f} s" for key in keys]
        lines.append(f"| {r['model']} | {r['samples']} | {r['batch_size']} | {r['S']} | {r['flavour']} | {r['tool']} | "
                     + " | ".join(phases) + f" | {ratio} | {diff} | {mem} |")
    lines += ["", "Step efficiency along U (e = q(η)/q*, q(η) = ḡᵀη − ½ηᵀC̄η, q* = q(C̄⁻¹ḡ); e_layer: the "
              "layer-block-diagonal C̄'s step, e_K-FAC: K̄⁺ḡ):", "",
              "| model | flavour | C̄ | cond(C̄) | q* | e_layer | e_K-FAC (curvscope) | e_K-FAC (curvlinops) |",
              "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        for flavour in dict.fromkeys(r["flavour"] for r in rows if r["model"] == name):
            got = {r["tool"].split()[0]: r for r in rows if r["model"] == name and r["flavour"] == flavour}
            first = next(iter(got.values()))
            e = [f"{got[t]['e_kfac']:.4g}" if t in got else "" for t in ("curvscope", "curvlinops")]
            lines.append(f"| {name} | {flavour} | {CURVATURES[first['curvature']]} | "
                         f"{first.get('condition_number', np.nan):.1e} | {first['q_star']:.4g} | "
                         f"{first['e_layer']:.4g} | {e[0]} | {e[1]} |")
    lines += ["", "Notes:", "", *kfac_notes(rows), ""]
    return "\n".join(lines + run_footer(rows))


def kfac_notes(rows: list[dict]) -> list[str]:
    """curvscope / curvlinops per flavour, for the total and for the factor pass alone (no target)."""
    out = []
    for r in rows:
        if r["ratio_to_curvlinops"] is not None:
            out.append(f"- {r['model']}, {r['flavour']}: curvscope / curvlinops = {r['ratio_to_curvlinops']:.2f} in "
                       f"total, {r['factors_ratio_to_curvlinops']:.2f} for the factor pass alone (no target)")
    if any(r["flavour"] == "mc" for r in rows):
        out.append("- mc: both tools draw labels by torch.multinomial; curvlinops from one generator seeded 0 for all "
                   "the batches, curvscope from one per batch (batch b seeded 0 + 1000003 b, so that its draws do "
                   "not depend on how many processes share the batches): they draw the same labels on the first "
                   "batch only, so the mc difference is a sampling difference, not an error")
    out.append("- curvlinops runs with separate_weight_and_bias=False (curvscope's joint [W | b] factors); with its "
               "default (True) the weight-bias entries of K̄ are 0")
    return out


# --------------------------------------------------------------------------- models suite (issue #16)

#: The models suite: "analyse" rows run the default `curvscope analyse` (curvscope.analysis.analyse_checkpoint on a
#: bundle written for it: ḡ, C̄, C̄⁻¹, interactions, step losses and the spectra, without the results file and the
#: figures); "spectra" rows build one Hessian operator and time top-k at both ends, Hutch++ trace and an SLQ density
#: through the Python API. Data: CIFAR-shaped `synthetic` images, or `token_data` (below) through the data plug-in
#: "bench:token_data" (scripts/ on the path, as when this file runs). `--models-config` overrides any entry.
MODELS_SUITE: dict[str, dict] = {
    # torchvision's resnet18 shape (7x7 stride-2 stem, max pooling), as in the issue's measurement on 32x32 inputs
    "resnet18": {"task": "analyse", "model": "resnet18", "model_kwargs": {"width": 64, "stem": "imagenet"},
                 "data": "synthetic", "data_kwargs": {"shape": [3, 32, 32], "num_classes": 10, "n": 64},
                 "samples": 64, "batch_size": 32},
    "gpt2": {"task": "analyse", "model": "gpt2",
             "model_kwargs": {"vocab_size": 512, "context": 64, "width": 128, "depth": 2, "heads": 4},
             "data": "bench:token_data", "data_kwargs": {"vocab_size": 512, "seq_len": 64, "n": 64},
             "samples": 64, "batch_size": 32},
    # Is the spectrum of a 1e8-parameter model possible in at most 20 GiB? GPT-2 small's widths and vocabulary with
    # 9 of its 12 layers: P = 103.2 M. Lanczos vectors are float64, 0.77 GiB each at this P; the model, its kept
    # graphs and a product's buffers take a few GiB more. The operator's budget (max_memory, as --max-memory) of
    # 12 GiB fits a restarted basis of 14 (15 vectors); Hutch++ holds 14 and SLQ (no reorthogonalisation) 4.
    "gpt2-1e8": {"task": "spectra", "model": "gpt2",
                 "model_kwargs": {"vocab_size": 50257, "context": 1024, "width": 768, "depth": 9, "heads": 12},
                 "data": "bench:token_data", "data_kwargs": {"vocab_size": 50257, "seq_len": 64, "n": 4},
                 "samples": 4, "batch_size": 4, "top_k": 5, "lanczos_steps": 80, "slq_steps": 80,
                 "trace_matvecs": 30, "max_memory": 12 * 2 ** 30,
                 "rss_limit_gib": 20},
}
#: --smoke: tiny configurations that check the suite runs end to end in a minute; their rows are marked as such
#: and are not results.
SMOKE: dict[str, dict] = {
    "resnet18": {"model_kwargs": {"width": 2}, "data_kwargs": {"shape": [3, 16, 16], "num_classes": 10, "n": 8},
                 "samples": 8, "batch_size": 4},
    "gpt2": {"model_kwargs": {"vocab_size": 32, "context": 8, "width": 8, "depth": 2, "heads": 2},
             "data_kwargs": {"vocab_size": 32, "seq_len": 8, "n": 8}, "samples": 8, "batch_size": 4},
    "gpt2-1e8": {"model_kwargs": {"vocab_size": 1000, "context": 16, "width": 32, "depth": 2, "heads": 2},
                 "data_kwargs": {"vocab_size": 1000, "seq_len": 16, "n": 4}, "samples": 4, "batch_size": 4,
                 "lanczos_steps": 30, "slq_steps": 30, "max_memory": 2 ** 30},
}


def token_data(split: str = "train", vocab_size: int = 512, seq_len: int = 64, n: int = 64, seed: int = 0):
    """The data plug-in "bench:token_data": n seeded uniform random token sequences of seq_len + 1 tokens, as
    (inputs, targets) = (tokens[:, :-1], tokens[:, 1:]), both (n, seq_len) int64: next-token prediction."""
    from curvscope.sources.datasets import Dataset

    gen = torch.Generator().manual_seed(2 * seed + (split == "test"))
    tokens = torch.randint(0, vocab_size, (n, seq_len + 1), generator=gen)
    return Dataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def models_config(name: str, smoke: bool = False, overrides: dict | None = None) -> dict:
    """The models suite's configuration of `name`: MODELS_SUITE's, then SMOKE's (when `smoke`), then `overrides`
    (a mapping of entries, e.g. {"samples": 4}), each replacing whole entries."""
    return {**MODELS_SUITE[name], **(SMOKE.get(name, {}) if smoke else {}), **(overrides or {})}


def _build_data(cfg: dict):
    from curvscope.sources.datasets import build_dataset

    return build_dataset(cfg["data"], "train", cfg["data_kwargs"])


def calibrate_batchnorm(model: torch.nn.Module, batches: list) -> bool:
    """Give BatchNorm layers the running statistics of `batches` (cumulative averages over one pass in train mode,
    no gradient, parameters untouched), as training would; the model is left in eval mode. Whether it has any."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()
    return True


def measured(fn: Callable[[], object], device: str = "cpu") -> SimpleNamespace:
    """`fn()` timed, with this process's resident set before the call and its peak during it, in MiB (peak reset
    just before the call, as in `peak_rss`; NaN where Linux's /proc is not there); on a CUDA `device`, also the
    peak of the memory torch allocated there during the call."""
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS") / 1024
    except (OSError, StopIteration):
        before = float("nan")
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    try:
        peak = _status_kib("VmHWM") / 1024
    except (OSError, StopIteration):
        peak = float("nan")
    return SimpleNamespace(seconds=seconds, result=out, rss_before_mib=before, peak_rss_mib=peak,
                           device_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)


def _accepted(fn: Callable, kwargs: dict) -> tuple[dict, dict]:
    """`kwargs` split into those `fn` takes and those it does not."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs), {}
    return ({k: v for k, v in kwargs.items() if k in params}, {k: v for k, v in kwargs.items() if k not in params})


def analyse_row(name: str, cfg: dict) -> dict:
    """The default `curvscope analyse` of `cfg`'s model (seeded, BatchNorm statistics calibrated on the analysis
    set) on its data: analyse_checkpoint on a bundle in a temporary folder, data named as with --data."""
    import tempfile

    from curvscope.analysis import analyse_checkpoint
    from curvscope.settings import AnalysisOptions
    from curvscope.sources.checkpoint import save_checkpoint
    from curvscope.sources.datasets import analysis_batches

    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["model_kwargs"])
    params = sum(p.numel() for _, p in trainable(model))
    data = _build_data(cfg)
    calibrated = calibrate_batchnorm(model, analysis_batches(data, cfg["samples"], cfg["batch_size"]))
    options = AnalysisOptions(samples=cfg["samples"], batch_size=cfg["batch_size"], data=cfg["data"],
                              data_kwargs=cfg["data_kwargs"], loss="cross_entropy", device=cfg.get("device", "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.pt"
        save_checkpoint(path, model, model_name=cfg["model"], model_kwargs=cfg["model_kwargs"], data={},
                        loss="cross_entropy", epoch=0)
        del model
        run = measured(lambda: analyse_checkpoint(path, options), cfg.get("device", "cpu"))
    rec = run.result[0]
    spec, attrs = rec.spectrum, rec.attrs
    nan = float("nan")
    spectrum_s = spec.elapsed_s if spec is not None else nan
    gradient_s, pseudo_s = float(attrs.get("gradient_s", nan)), float(attrs.get("pseudo_s", nan))
    notes = ["BatchNorm statistics calibrated on the analysis set" if calibrated else "",
             attrs.get("batchnorm_warning", ""), attrs.get("determinism_warning", ""), attrs.get("outputs", "")]
    return {"model": name, "task": "analyse", "config": cfg, "P": params, "S": len(rec.pseudo.names),
            "samples": int(attrs["n_samples"]), "batch_size": cfg["batch_size"],
            "seq_len": cfg["data_kwargs"].get("seq_len"), "loss": float(attrs["loss_value"]),
            "total_s": run.seconds, "gradient_s": gradient_s, "pseudo_s": pseudo_s, "spectrum_s": spectrum_s,
            "rest_s": run.seconds - np.nansum([gradient_s, pseudo_s, spectrum_s]),
            "products": spec.products if spec is not None else 0, "mode": spec.mode if spec is not None else "",
            "graph_bytes": spec.graph_bytes if spec is not None else 0,
            "blocks": len(spec.blocks) if spec is not None else 0,
            "top": spec.top.values.tolist() if spec is not None else None,
            "top_converged": int(spec.top.converged.sum()) if spec is not None else 0,
            "bottom": spec.bottom.values.tolist() if spec is not None else None,
            "bottom_converged": int(spec.bottom.converged.sum()) if spec is not None else 0,
            "strategy": attrs.get("strategy"), "device": str(attrs.get("device", "cpu")),
            "rss_before_mib": run.rss_before_mib, "peak_rss_mib": run.peak_rss_mib,
            "device_peak_mib": run.device_peak_mib, "note": "; ".join(n for n in notes if n)}


def spectra_row(name: str, cfg: dict) -> dict:
    """Top-k at both ends, Hutch++ trace and an SLQ density (1 run) of the Hessian of `cfg`'s model on its data,
    sharing one operator; each timed, with the process's peak resident set over all of it."""
    from curvscope import curvature_operator, eigenvalues, spectral_density, trace
    from curvscope.sources.datasets import analysis_batches

    torch.manual_seed(0)
    device = cfg.get("device", "cpu")
    model = build_model(cfg["model"], cfg["model_kwargs"]).eval().to(device)
    P = sum(p.numel() for _, p in trainable(model))
    batches = analysis_batches(_build_data(cfg), cfg["samples"], cfg["batch_size"])
    eigen_kw, eigen_skipped = _accepted(eigenvalues, cfg.get("eigen_kwargs", {}))
    density_kw, density_skipped = _accepted(spectral_density, cfg.get("density_kwargs", {}))
    k, steps = cfg["top_k"], cfg["lanczos_steps"]
    times: dict[str, float] = {}
    products: dict[str, int] = {}
    out: dict[str, Any] = {}

    def work() -> None:
        with curvature_operator(model, build_loss("cross_entropy"), batches, "hessian",
                                max_memory=cfg.get("max_memory", DEFAULT_MAX_MEMORY)) as op:
            tasks = {"largest": lambda: eigenvalues(op, k=k, which="largest", max_steps=steps, **eigen_kw),
                     "smallest": lambda: eigenvalues(op, k=k, which="smallest", max_steps=steps, **eigen_kw),
                     "trace": lambda: trace(op, matvecs=cfg["trace_matvecs"]),
                     "density": lambda: spectral_density(op, runs=1, steps=cfg["slq_steps"], **density_kw)}
            for task, fn in tasks.items():
                count, start = op.count, time.perf_counter()
                out[task] = fn()
                times[task], products[task] = time.perf_counter() - start, op.count - count
            out["mode"], out["graph_bytes"] = op.mode, op.graph_bytes

    run = measured(work, device)
    top, bottom, tr = out["largest"], out["smallest"], out["trace"]
    whole = _status_kib("VmHWM") / 1024 if Path("/proc/self/status").exists() else float("nan")
    skipped = {**eigen_skipped, **density_skipped}
    return {"model": name, "task": "spectra", "config": cfg, "P": P, "S": len(trainable(model)),
            "samples": cfg["samples"], "batch_size": cfg["batch_size"], "seq_len": cfg["data_kwargs"].get("seq_len"),
            "total_s": run.seconds, **{f"{t}_s": v for t, v in times.items()},
            **{f"{t}_products": v for t, v in products.items()}, "products": sum(products.values()),
            "top": top.values.tolist(), "top_converged": int(top.converged.sum()),
            "bottom": bottom.values.tolist(), "bottom_converged": int(bottom.converged.sum()),
            "trace": tr.value, "trace_stderr": tr.stderr, "mode": out["mode"], "graph_bytes": out["graph_bytes"],
            "device": device, "rss_before_mib": run.rss_before_mib, "peak_rss_mib": run.peak_rss_mib,
            "process_peak_rss_mib": whole, "device_peak_mib": run.device_peak_mib,
            "rss_limit_gib": cfg.get("rss_limit_gib"),
            "note": (f"not taken by this curvscope, so not passed: {json.dumps(skipped)}" if skipped else "")}


def models_row(name: str, cfg: dict) -> dict:
    """One row of the models suite (see MODELS_SUITE), in this process."""
    return (analyse_row if cfg["task"] == "analyse" else spectra_row)(name, cfg)


def bench_models(name: str, smoke: bool = False, overrides: dict | None = None, in_process: bool = False) -> dict:
    """The models suite's row of `name`, measured in a fresh process (so that its peak memory is its own) unless
    `in_process`; a failed run gives a row with its error."""
    cfg = models_config(name, smoke, overrides)
    if in_process:
        row = models_row(name, cfg)
    else:
        cmd = [sys.executable, __file__, "--models-row", name, "--threads", str(torch.get_num_threads())]
        if smoke:
            cmd.append("--smoke")
        if overrides:
            cmd += ["--models-config", json.dumps({name: overrides})]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            if done.returncode < 0:
                why = f"killed by signal {-done.returncode} (out of memory?); {why}"
            return {"model": name, "task": cfg["task"], "config": cfg, "smoke": smoke, "error": why}
        row = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "smoke": smoke, "error": None}


def _mib(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def _memory(r: dict, key: str) -> str:
    """A row's peak resident set, and its peak on a CUDA device when it ran there."""
    device = r.get("device_peak_mib")
    return _mib(r.get(key)) + ("" if device is None else f" (+ {_mib(device)} on {r['device']})")


def _count(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:.1f} M" if value >= 1e6 else f"{value:,}"


def models_markdown(rows: list[dict]) -> str:
    smoke = any(r.get("smoke") for r in rows)
    lines = (["**Smoke run** (`--smoke`: tiny configurations that check the suite runs end to end; these are not "
              "results).", ""] if smoke else [])
    analyse = [r for r in rows if r["task"] == "analyse"]
    if analyse:
        lines += ["Default `curvscope analyse` (Hessian: ḡ, H̄, H̄⁻¹, interactions, step losses, spectra; no results "
                  "file or figures). Rest: loading, the checks of the model and data, H̄⁻¹, the interaction "
                  "measures and the step losses. Products: the spectra's Hessian-vector products.", "",
                  "| model | P | S | N | B | T | total | gradient | H̄ | spectra | rest | products | graphs | "
                  "peak RSS | top eigenvalue | note |", "|" + "---|" * 16]
        for r in analyse:
            head = f"| {r['model']}{' (smoke)' if r.get('smoke') else ''} |"
            if r.get("error"):
                lines.append(head + f" | | | | | failed | | | | | | | | | {r['error'][:160]} |")
                continue
            top = f"{r['top'][0]:.4g} ({r['top_converged']}/{len(r['top'])} conv.)" if r["top"] else ""
            lines.append(head + f" {_count(r['P'])} | {r['S']} | {r['samples']} | {r['batch_size']} | "
                         f"{r['seq_len'] or ''} | {r['total_s']:.1f} s | {r['gradient_s']:.1f} s | "
                         f"{r['pseudo_s']:.1f} s | {r['spectrum_s']:.1f} s | {r['rest_s']:.1f} s | {r['products']} | "
                         f"{r['mode']} ({_mib(r['graph_bytes'] / 2**20)}) | {_memory(r, 'peak_rss_mib')} | {top} | "
                         f"{r['note'][:160]} |")
        lines.append("")
    spectra = [r for r in rows if r["task"] == "spectra"]
    if spectra:
        lines += ["Spectra of a large model (one Hessian operator; top-k at both ends, Hutch++ trace, SLQ density of "
                  "1 run):", "",
                  "| model | P | N | T | largest | smallest | trace | density | total | products | peak RSS "
                  "(process) | within limit | note |", "|" + "---|" * 13]
        for r in spectra:
            head = f"| {r['model']}{' (smoke)' if r.get('smoke') else ''} |"
            if r.get("error"):
                lines.append(head + f" | | | failed | | | | | | | | {r['error'][:160]} |")
                continue
            peak = r.get("process_peak_rss_mib", np.nan)
            limit = r.get("rss_limit_gib")
            ok = "" if limit is None or not np.isfinite(peak) else ("yes" if peak <= limit * 1024 else "**no**")
            cells = [f"{r[f'{t}_s']:.1f} s ({r[f'{t}_products']})" for t in ("largest", "smallest", "trace",
                                                                              "density")]
            lines.append(head + f" {_count(r['P'])} | {r['samples']} | {r['seq_len'] or ''} | " + " | ".join(cells)
                         + f" | {r['total_s']:.1f} s | {r['products']} | {_memory(r, 'process_peak_rss_mib')} | "
                         f"{ok}{f' (≤ {limit} GiB)' if limit else ''} | {r['note'][:160]} |")
        lines += ["", "Cells: time (products). Values:", ""]
        for r in spectra:
            if not r.get("error"):
                lines.append(f"- {r['model']}: largest {', '.join(f'{v:.4g}' for v in r['top'])} "
                             f"({r['top_converged']}/{len(r['top'])} converged); smallest "
                             f"{', '.join(f'{v:.4g}' for v in r['bottom'])} ({r['bottom_converged']}/{len(r['bottom'])}"
                             f" converged); trace {r['trace']:.4g} ± {r['trace_stderr']:.2g}")
        lines.append("")
    for name in dict.fromkeys(r["model"] for r in rows):  # one run each, in its own process
        r = next(q for q in rows if q["model"] == name)
        if "date" in r:
            lines.append(f"- {name}: one run in a fresh process, {r['date']}, {r['machine']}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- order-3 suite (issue #18)

ORDER3_DAMPINGS = (0.1, 1.0, 10.0)
#: The order-3 suite's models: the pseudo-Hessian suite's (at initialisation, CIFAR-shaped data) and the shipped
#: trained LeNet-5 on its digits (where the cubic steps exist).
ORDER3_MODELS = (*SETTINGS, "lenet5_digits_ep21")


def order3_setup(name: str) -> tuple[torch.nn.Module, list, Callable]:
    """The model, batches and loss of an order-3 row: the shipped checkpoint on 1024 digits in batches of 256
    with its loss, or :func:`curvature_setup`'s with nll (the pseudo-Hessian suite's)."""
    if name in SETTINGS:
        return (*curvature_setup(name), build_loss("nll"))
    from curvscope import load_checkpoint
    from curvscope.sources.datasets import analysis_batches, build_dataset

    ck = load_checkpoint(Path(__file__).resolve().parents[1] / "checkpoints" / f"{name}.pt")
    data = build_dataset(ck.data["name"], "train", ck.data.get("kwargs") or {})
    return ck.model.eval(), analysis_batches(data, 1024, 256), ck.loss_fn


def bench_order3(name: str) -> list[dict]:
    """H̄, ḡ and the order-3 diagonal D on the pseudo-Hessian suite's model and data, by curvscope (gradient pass,
    projection, order3) and by the author's GroupedNewton (fullbatch_gradient, then compute_Hg_fullbatch with
    noregul=False; its modules from GRNEWT_SRC, the src/grnewt folder of a checkout), each timed; their agreement,
    and that of the cubic-regularised learning rates (nesterov_lrs against cubic_learning_rates) per λ_int."""
    from curvscope import curvature_operator
    from curvscope.curvature.operator import full_gradient
    from curvscope.curvature.partition import make_partition
    from curvscope.measures.cubic import cubic_learning_rates

    src = os.environ.get("GRNEWT_SRC")
    if not src:
        return [{"model": name, "error": "GRNEWT_SRC is not set (the src/grnewt folder of a GroupedNewton checkout)"}]
    import peers

    peers.load_grnewt(src)
    from grnewt.hg import compute_Hg_fullbatch
    from grnewt.nesterov import nesterov_lrs
    from grnewt.util.param_struct import ParamStructure

    model, batches, loss_fn = order3_setup(name)
    model = model.double()
    batches = [(x.double(), y) for x, y in batches]
    n = sum(len(y) for _, y in batches)

    def ours() -> tuple:
        with curvature_operator(model, loss_fn, batches) as op:
            part = make_partition(op.obj.model)
            grad = full_gradient(op.obj, op.params)
            res = op.projection(part, gradient=grad)
            return res, op.order3(part, grad)[0]

    def theirs() -> tuple:
        params = [p for p in model.parameters() if p.requires_grad]
        grad = gradient_pass(model, loss_fn, batches)
        ps = ParamStructure([{"params": [p]} for p in params])
        return compute_Hg_fullbatch(ps, lambda x, y: loss_fn(model(x), y), batches, n, tuple(grad),
                                    loader_pre_hook=lambda x, y: (x, y), noregul=False)

    t_ours, (res, d) = best_time(ours, 1)
    t_theirs, (h, g, order3) = best_time(theirs, 1)
    rows = {"model": name, "samples": n, "batch_size": batches[0][1].shape[0], "S": len(res.names),
            "dtype": "float64", "curvscope_s": t_ours, "author_s": t_theirs, "ratio": t_ours / t_theirs,
            "hbar_rel_diff": _max_rel_diff(res.pseudo_hessian, h.numpy()),
            "order3_rel_diff": _max_rel_diff(d, -order3.numpy()), "error": None, "lrs": []}
    for lam in ORDER3_DAMPINGS:
        ref, logs = nesterov_lrs(h, g, order3, damping_int=lam)
        mine = cubic_learning_rates(res.pseudo_hessian, res.pseudo_gradient, d, lam)
        rows["lrs"].append({"damping_int": lam, "found": mine.found, "author_found": bool(logs["found"]),
                            "rel_diff": _max_rel_diff(mine.learning_rates, ref.numpy()) if mine.found and
                            ref is not None else None})
    return [rows]


def order3_markdown(rows: list[dict]) -> str:
    lines = ["H̄, ḡ and D in float64 on the pseudo-Hessian suite's models (gradient pass included), curvscope against "
             "the author's GroupedNewton (`compute_Hg_fullbatch(..., noregul=False)`); max relative differences of "
             "H̄, of D (theirs is along +U: −D) and of the learning rates of `nesterov_lrs` against "
             "`cubic_learning_rates`.", "",
             "| model | N | B | S | curvscope | author | ratio | H̄ diff. | D diff. | learning rates diff. (λ_int) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | | | | | | | | | {r['error']} |")
            continue
        lrs = ", ".join(f"{x['rel_diff']:.1e} ({x['damping_int']:g})" if x["rel_diff"] is not None else
                        f"found {x['found']}/{x['author_found']} ({x['damping_int']:g})" for x in r["lrs"])
        lines.append(f"| {r['model']} | {r['samples']} | {r['batch_size']} | {r['S']} | {r['curvscope_s']:.2f} s | "
                     f"{r['author_s']:.2f} s | **{r['ratio']:.2f}x** | {r['hbar_rel_diff']:.1e} | "
                     f"{r['order3_rel_diff']:.1e} | {lrs} |")
    lines.append("")
    lines += run_footer(rows)
    return "\n".join(lines)


# --------------------------------------------------------------------------- distributed suite (issue #17)

#: Strong scaling on CPU: the same VGG-11' and N = 512 CIFAR-shaped samples (batches of 64) in 1 and 2 torchrun
#: processes of one thread each. H̄: the gradient pass and the projection; spectra: the Hutch++ trace with
#: `trace_matvecs` Hessian-vector products, whose solver runs on rank 0 while every rank multiplies its batches
#: (the path of every spectrum); per-product time and rate given too.
DISTRIBUTED = {"vgg11": {"samples": 512, "batch_size": 64, "trace_matvecs": 12, "ranks": [1, 2]}}


def distributed_row(name: str) -> dict:
    """One process of a distributed run (under torchrun): every stage timed between barriers; rank 0's row."""
    import torch.distributed as dist

    from curvscope import curvature_operator, trace
    from curvscope.curvature.operator import full_gradient
    from curvscope.curvature.partition import make_partition
    from curvscope.curvature.ranks import join, shard, world

    join("cpu")
    cfg = DISTRIBUTED[name]
    torch.manual_seed(0)
    model = build_model(name).eval()
    batches = shard(cifar_shaped(cfg["samples"], cfg["batch_size"]))
    part = make_partition(model, "canonical")
    loss_fn = build_loss("nll")  # as in the pseudo-Hessian suite
    times: dict[str, float] = {}

    def stage(key: str, fn: Callable[[], Any]) -> Any:
        dist.barrier() if dist.is_initialized() else None
        start = time.perf_counter()
        out = fn()
        dist.barrier() if dist.is_initialized() else None
        times[key] = time.perf_counter() - start
        return out

    with curvature_operator(model, loss_fn, batches, "hessian") as op:
        gradient = stage("gradient_s", lambda: full_gradient(op.obj, op.params))
        res = stage("projection_s", lambda: op.projection(part, gradient=gradient))
        stage("graphs_s", op.prepare)  # built once before the products, on every rank
        tr = stage("trace_s", lambda: trace(op, matvecs=cfg["trace_matvecs"]))
        products = op.count
    rank, size = world()
    return {"model": name, "ranks": size, "threads": torch.get_num_threads(), "samples": cfg["samples"],
            "batch_size": cfg["batch_size"], "batches_rank0": len(batches), **times,
            "pseudo_s": times["gradient_s"] + times["projection_s"], "products": products,
            "product_s": times["trace_s"] / max(products, 1), "hbar": res.pseudo_hessian.tolist(),
            "trace": tr.value, "peak_rss_mib": _status_kib("VmHWM") / 1024, "rank": rank}


def bench_distributed(name: str) -> list[dict]:
    """`name` under torchrun with each number of ranks of DISTRIBUTED, one thread each, in fresh processes."""
    rows = []
    for ranks in DISTRIBUTED[name]["ranks"]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               __file__, "--distributed-row", name, "--threads", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            rows.append({"model": name, "ranks": ranks, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append({**json.loads(lines[-1]), "error": None})
    base = next((r for r in rows if r.get("ranks") == 1 and not r["error"]), None)
    for r in rows:
        if base is not None and not r["error"]:
            r["speedup_pseudo"] = base["pseudo_s"] / r["pseudo_s"]
            r["speedup_trace"] = base["trace_s"] / r["trace_s"]
            r["hbar_rel_diff"] = _max_rel_diff(np.asarray(r["hbar"]), np.asarray(base["hbar"]))
            r["trace_rel_diff"] = abs(r["trace"] - base["trace"]) / abs(base["trace"])
    for r in rows:
        r.pop("hbar", None)  # compared above; too long for the report
    return rows


def distributed_markdown(rows: list[dict]) -> str:
    lines = ["Strong scaling on CPU (torchrun --standalone, gloo, one torch thread per process): H̄ is the gradient "
             "pass and the projection; spectra, the Hutch++ trace's Hessian-vector products (solver on rank 0, "
             "products summed over the ranks). Speed-up against 1 process; difference: max relative difference "
             "of H̄ (and of the trace) from the 1-process run.", "",
             "| model | N | B | processes | H̄ | speed-up | spectra (products) | per product | speed-up | "
             "peak RSS (rank 0) | H̄ diff. | trace diff. |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | | | {r['ranks']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['samples']} | {r['batch_size']} | {r['ranks']} | {r['pseudo_s']:.1f} s | "
                     f"**{r.get('speedup_pseudo', float('nan')):.2f}x** | {r['trace_s']:.1f} s ({r['products']}) | "
                     f"{r['product_s']:.2f} s | **{r.get('speedup_trace', float('nan')):.2f}x** | "
                     f"{_mib(r['peak_rss_mib'])} | {r.get('hbar_rel_diff', float('nan')):.1e} | "
                     f"{r.get('trace_rel_diff', float('nan')):.1e} |")
    lines.append("")
    lines += run_footer(rows)
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


SUITE_MODELS = {"pseudo-hessian": list(SETTINGS), "spectrum": list(SETTINGS), "curvatures": list(SETTINGS),
                "kfac": list(SETTINGS), "models": list(MODELS_SUITE), "distributed": list(DISTRIBUTED),
                "order3": list(ORDER3_MODELS)}


def suite_models(suite: str, requested: list[str] | None) -> list[str]:
    """The models `suite` runs: those of `requested` it has (all of its own when None)."""
    own = SUITE_MODELS[suite]
    return list(own) if requested is None else [m for m in requested if m in own]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every_model = list(dict.fromkeys(m for names in SUITE_MODELS.values() for m in names))
    parser.add_argument("--models", nargs="+", default=None, choices=every_model,
                        help="models to run, among those of the suites asked for [default: each suite's own: lenet5 "
                             "and vgg11; the models suite's resnet18, gpt2 and gpt2-1e8]")
    parser.add_argument("--strategies", nargs="+", default=["auto", "batched"],
                        choices=["auto", "triangular", "batched"])
    parser.add_argument("--suites", nargs="+", default=["pseudo-hessian", "spectrum"],
                        choices=list(SUITE_MODELS))
    parser.add_argument("--flavours", nargs="+", default=list(KFAC_FLAVOURS), choices=list(KFAC_FLAVOURS),
                        help="K-FAC suite: the flavours to run")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other models already in the suite's JSON file (and its table)")
    parser.add_argument("--no-memory", action="store_true",
                        help="curvatures and K-FAC suites: skip the peak-memory probes")
    parser.add_argument("--check-float64", action="store_true",
                        help="curvatures and K-FAC suites: also compare Ḡ and F̄ (K̄ of type-2 and empirical) with "
                             "curvlinops' in float64 (untimed)")
    parser.add_argument("--smoke", action="store_true",
                        help="models suite: tiny configurations that check it runs (rows marked as smoke runs)")
    parser.add_argument("--device", default=None,
                        help="models suite: where to compute (cpu, cuda[:i]) [default: cpu]")
    parser.add_argument("--models-config", type=json.loads, default={}, metavar="JSON",
                        help='models suite: entries replacing a model\'s configuration, e.g. '
                             '\'{"gpt2-1e8": {"samples": 4}}\'')
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    parser.add_argument("--models-row", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--distributed-row", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        return _probe(*args.probe)
    if args.device is not None:
        for name in MODELS_SUITE:
            args.models_config[name] = {"device": args.device, **args.models_config.get(name, {})}
    if args.models_row:  # one row of the models suite, in this (fresh) process, as JSON on the last line
        cfg = models_config(args.models_row, args.smoke, args.models_config.get(args.models_row))
        print(json.dumps(models_row(args.models_row, cfg)))
        return None
    if args.distributed_row:  # one process of a torchrun launch of the distributed suite; rank 0 prints its row
        row = distributed_row(args.distributed_row)
        if row["rank"] == 0:
            print(json.dumps(row))
        return None
    if not (isinstance(args.models_config, dict) and all(isinstance(v, dict) for v in args.models_config.values())):
        parser.error("--models-config takes a JSON object of objects, e.g. '{\"gpt2\": {\"samples\": 8}}'")
    unknown = set(args.models_config) - set(MODELS_SUITE)
    if unknown:
        parser.error(f"--models-config names models not in the models suite: {', '.join(sorted(unknown))}")
    if args.models is not None:
        unused = [m for m in args.models if not any(m in SUITE_MODELS[s] for s in args.suites)]
        if unused:
            parser.error(f"no suite asked for runs {', '.join(unused)}")
    env = {"curvscope": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "cpu_model": _cpu_model(), "cores": os.cpu_count(),
           "load_average_at_start": os.getloadavg()}
    machine = (f"{env['cpu_model']}, {env['cores']} cores, {env['threads']} torch threads, torch {env['torch']}, "
               f"load average {env['load_average_at_start'][0]:.1f} at the start")
    args.out.mkdir(parents=True, exist_ok=True)
    suites = {"pseudo-hessian": ("pseudo_hessian", lambda m: [bench_pseudo_hessian(m, args.repeat, args.strategies)],
                                 lambda rows: markdown(rows, args.strategies)),
              "spectrum": ("spectrum", lambda m: bench_spectrum(m, args.repeat), spectrum_markdown),
              "curvatures": ("curvatures", lambda m: bench_curvatures(m, args.repeat, not args.no_memory,
                                                                      args.check_float64), curvatures_markdown),
              "kfac": ("kfac", lambda m: bench_kfac(m, args.repeat, args.flavours, not args.no_memory,
                                                    args.check_float64), kfac_markdown),
              "models": ("models", lambda m: [bench_models(m, args.smoke, args.models_config.get(m))],
                         models_markdown),
              "distributed": ("distributed", bench_distributed, distributed_markdown),
              "order3": ("order3", bench_order3, order3_markdown)}
    for suite in args.suites:
        stem, run, table_of = suites[suite]
        names = suite_models(suite, args.models)
        rows = []
        for name in names:
            for row in run(name):
                rows.append({**row, "repeat": args.repeat, "date": env["date"], "machine": machine})
                print(json.dumps(row), flush=True)
        path = args.out / f"{stem}.json"
        if args.merge and path.exists():  # keep the rows of the models not run now
            rows = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in names] + rows
        table = table_of(rows)
        print(f"\n{table}\n\n{env}\n", flush=True)
        path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        (args.out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
