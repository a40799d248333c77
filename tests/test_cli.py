"""The command line end to end: the README's main job, info, render, re-runs, and every bad input."""
from __future__ import annotations

import hashlib
import importlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, SHIPPED, interruptible, write_tiny_bundle

from curvscope.cli.main import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_main_job_on_the_shipped_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "lenet5.h5"
    res = run("analyse", SHIPPED, "-o", out, "--scale", "linear", "--scale", "normalized", "--samples", "512",
              "--lanczos-steps", "40")
    assert res.exit_code == 0, res.output
    assert "lenet5_digits_ep21: loss" in res.output and "positive definite" in res.output
    assert "top eigenvalues" in res.output and "Hessian-vector products (cached)" in res.output
    figures = tmp_path / "reports" / "lenet5"
    for name in ("heatmaps-linear", "heatmaps-normalized", "spectrum-density", "spectrum-blocks"):
        assert (figures / f"lenet5_digits_ep21-{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (figures / f"lenet5_digits_ep21-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with h5py.File(out) as fh:
        grp = fh["checkpoints/lenet5_digits_ep21"]
        assert grp.attrs["n_samples"] == 512 and grp.attrs["epoch"] == 21 and grp["pseudo_hessian"].shape == (10, 10)
        assert grp["spectrum/top/values"].shape == (5,) and grp["spectrum/top/converged"].dtype == bool
        assert sorted(grp["spectrum/blocks"]) == sorted(
            [f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for kind in ("weight", "bias")]
            + ["conv1", "conv2", "fc1", "fc2", "fc3"])
    info = run("info", out)
    assert info.exit_code == 0 and "lenet5 on digits (train), epoch 21, N=512" in info.output
    assert "conv1.weight" in info.output
    again = run("render", out, "--out-dir", tmp_path / "again", "--scale", "symlog")
    assert again.exit_code == 0
    assert (tmp_path / "again" / "lenet5_digits_ep21-heatmaps-symlog.pdf").stat().st_size > 1000


def test_rerun_skips_stored_labels_unless_overwrite(tmp_path: Path) -> None:
    ck = write_tiny_bundle(tmp_path / "tiny_ep03.pt")
    out = tmp_path / "r.h5"
    assert run("analyse", ck, "-o", out, "--no-render", "--no-spectrum").exit_code == 0
    with h5py.File(out) as fh:
        assert "spectrum" not in fh["checkpoints/tiny_ep03"]
    before = digest(out)
    res = run("analyse", ck, "-o", out, "--no-render")
    assert res.exit_code == 0 and "skipped" in res.output and digest(out) == before
    res = run("analyse", ck, "-o", out, "--no-render", "--overwrite", "--partition", "layer", "--top-k", "2")
    assert res.exit_code == 0 and digest(out) != before
    with h5py.File(out) as fh:
        assert fh["checkpoints/tiny_ep03"].attrs["partition"] == "layer"
        assert fh["checkpoints/tiny_ep03/spectrum/top/values"].shape == (2,)


def test_overwrite_warns_of_stored_parts_it_does_not_recompute(tmp_path: Path) -> None:
    ck = write_tiny_bundle(tmp_path / "tiny_ep03.pt")
    out = tmp_path / "r.h5"
    assert run("analyse", ck, "-o", out, "--no-render", "--top-k", "2").exit_code == 0
    res = CliRunner().invoke(main, ["analyse", str(ck), "-o", str(out), "--no-render", "--overwrite", "-q",
                                    "--no-spectrum"])
    assert res.exit_code == 0 and res.stdout == ""
    assert ("warning: --overwrite replaces tiny_ep03, whose stored spectra this run does not compute (--spectrum "
            "would): they will be gone.") in " ".join(res.stderr.split())
    res = CliRunner().invoke(main, ["analyse", str(ck), "-o", str(out), "--no-render", "--overwrite", "-q",
                                    "--top-k", "2"])
    assert res.exit_code == 0 and res.stderr == ""  # nothing stored is lost


def test_threads_are_set_for_the_analysis_recorded_and_restored(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    out = tmp_path / "r.h5"
    for threads, shown in ((1, "(1 thread)"), (None, f"({before} thread")):
        extra = ["--threads", str(threads)] if threads else []
        res = run("analyse", write_tiny_bundle(tmp_path / "t.pt"), "-o", out, "--no-render", "--no-spectrum",
                  "--overwrite", *extra)
        assert res.exit_code == 0 and torch.get_num_threads() == before, res.output
        with h5py.File(out) as fh:
            assert fh["checkpoints/t"].attrs["threads"] == (threads or before)
        assert shown in run("info", out).output
    assert run("analyse", tmp_path / "t.pt", "--threads", "0").exit_code == 2


def test_render_refuses_options_no_figure_would_use(tmp_path: Path) -> None:
    """One checkpoint analysed in one batch without spectra: --density-width, --grey-insignificant and
    --shared-scale would change nothing, so each is refused (exit 2) and no figure is drawn."""
    out = tmp_path / "r.h5"
    assert run("analyse", write_tiny_bundle(tmp_path / "t.pt"), "-o", out, "--no-render", "--no-spectrum",
               "--batch-size", "64").exit_code == 0
    for option, message in ((["--density-width", "0.05"], "no checkpoint rendered has spectra"),
                            (["--grey-insignificant"], "has standard errors (one batch gives none)"),
                            (["--shared-scale"], "the checkpoints rendered make none")):
        res = run("render", out, "--out-dir", tmp_path / "f", *option)
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "f").exists()
    assert run("render", out, "--out-dir", tmp_path / "f").exit_code == 0


def test_a_closed_stdout_exits_141_without_a_word(tmp_path: Path) -> None:
    """`curvscope info R | true`: the reader left; exit 141, as a shell reports SIGPIPE, not click's 1 (which
    would read as an audit's "not valid"), and nothing on stderr."""
    out = tmp_path / "r.h5"
    res = run("analyse", write_tiny_bundle(tmp_path / "t.pt"), "-o", out, "--no-render", "--no-spectrum")
    assert res.exit_code == 0
    for command in (f"info {out}", f"audit {out}"):
        done = subprocess.run(["bash", "-c", f"{sys.executable} -m curvscope {command} | true; "
                                             "echo ${PIPESTATUS[0]} >&2"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.stderr.strip() == "141", done.stderr


def test_no_command_shows_the_help_as_it_is() -> None:
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 2 and "curvscope: error" not in res.output
    assert res.output.startswith("Usage: ") and "\nCommands:\n  analyse" in res.output


def test_several_checkpoints_in_one_file(tmp_path: Path) -> None:
    a = write_tiny_bundle(tmp_path / "tiny_ep01.pt", epoch=1)
    b = write_tiny_bundle(tmp_path / "tiny_ep02.pt", epoch=2)
    os.chdir(tmp_path)
    res = run("analyse", a, b, "-q")
    assert res.exit_code == 0 and res.output == ""
    with h5py.File(tmp_path / "reports" / "tiny_ep0.h5") as fh:
        assert sorted(fh["checkpoints"]) == ["tiny_ep01", "tiny_ep02"]
    assert len(list((tmp_path / "reports" / "tiny_ep0").glob("tiny_ep0?-heatmaps-linear.png"))) == 2
    assert len(list((tmp_path / "reports" / "tiny_ep0").glob("*-spectrum-*.pdf"))) == 4
    assert (tmp_path / "reports" / "tiny_ep0" / "trajectory-heatmaps-linear.pdf").is_file()


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A results file that every failing run below must leave byte for byte as it was."""
    out = tmp_path / "r.h5"
    assert run("analyse", write_tiny_bundle(tmp_path / "good.pt"), "-o", out, "--no-render").exit_code == 0
    return out


def _random(tmp: Path) -> Path:
    (tmp / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    return tmp / "random.pt"


BAD = {
    "missing checkpoint": (lambda tmp: [tmp / "nope.pt"], "does not exist"),
    "not a checkpoint": (lambda tmp: [_random(tmp)], "not a"),
    "unknown model": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--model", "resnet9"], "unknown model 'resnet9'"),
    "infinite loss": (lambda tmp: [write_tiny_bundle(tmp / "t.pt", scale=1e38)], "the loss is inf"),
    "bad JSON": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--model-kwargs", "{in:"], "JSON object"),
    "too many samples": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--samples", "41"], "larger than"),
    "unknown data set": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--data", "imagenet"], "unknown data set"),
    "no CUDA": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--device", "cuda:7"], "CUDA|device"),
    "discrete too big": (lambda tmp: [SHIPPED, "--partition", "discrete"], "discrete partition"),
    "bad memory size": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--max-memory", "lots"], "memory size"),
    "zero top-k": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--top-k", "0"], "top-k"),
    "labels out of range": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--data-kwargs",
                                         '{"shape": [12], "num_classes": 7, "n": 40}'], "cannot be evaluated"),
    "data shape does not fit": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--data-kwargs",
                                             '{"shape": [5], "num_classes": 3, "n": 40}'], "cannot be evaluated"),
    "empty data set": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--samples", "0"], "--samples.*x>=1"),
    "unknown plug-in": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--model", "nowhere.mod:f"], "cannot import"),
    "text as checkpoint": (lambda tmp: [_text(tmp)], "neither a zip archive nor a pickle"),
    "truncated checkpoint": (lambda tmp: [_truncated(tmp)], "damaged or truncated"),
    "results file as checkpoint": (lambda tmp: [_hdf5(tmp)], "is an HDF5 file .* 'curvscope info'"),
    "spectra beyond --max-memory": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--max-memory", "1K"],
                                    r"need 1\d\.\d KiB of float64 vectors and --max-memory allows 1 KiB"),
    "--damping-int without --order3": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--damping-int", "1"],
                                       "--damping-int does nothing without --order3"),
    "spectrum option without spectra": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--no-spectrum", "--top-k",
                                                     "3"], "--top-k does nothing without --spectrum"),
    "K-FAC option for the Hessian": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--kfac-approximation",
                                                  "reduce"], "without --curvature ggn or fisher"),
    "--kfac-samples without --kfac mc": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--curvature", "fisher",
                                                      "--kfac-samples", "3"], "--kfac-samples does nothing"),
    "figure options without figures": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--no-render", "--scale",
                                                    "normalized", "--figures", tmp / "f"],
                                       "--scale, --figures set how figures are drawn, but --no-render draws none"),
    "--shared-scale for one checkpoint": (lambda tmp: [write_tiny_bundle(tmp / "t.pt"), "--shared-scale"],
                                          "which one checkpoint does not make"),
}
BEFORE_WORK = {"figure options without figures", "--shared-scale for one checkpoint",
               "text as checkpoint", "truncated checkpoint", "results file as checkpoint",
               "spectra beyond --max-memory", "--damping-int without --order3", "spectrum option without spectra",
               "K-FAC option for the Hessian", "--kfac-samples without --kfac mc"}


def _text(tmp: Path) -> Path:
    (tmp / "notes.pt").write_text("hello world\n")
    return tmp / "notes.pt"


def _truncated(tmp: Path) -> Path:
    whole = write_tiny_bundle(tmp / "whole.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(whole[:len(whole) // 2])
    return tmp / "cut.pt"


def _hdf5(tmp: Path) -> Path:
    h5py.File(tmp / "results.h5", "w").close()
    return tmp / "results.h5"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_and_leaves_results_intact(tmp_path: Path, existing: Path, case: str) -> None:
    make, message = BAD[case]
    before = digest(existing)
    res = CliRunner().invoke(main, [str(a) for a in ["analyse", *make(tmp_path), "-o", existing]])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    import re
    assert re.search(message, " ".join(res.output.split())), res.output  # the paragraph wraps anywhere
    assert digest(existing) == before
    if case in BEFORE_WORK:
        assert "gradient" not in res.output, res.output


def test_unwritable_output_and_newer_schema(tmp_path: Path) -> None:
    ck = write_tiny_bundle(tmp_path / "t.pt")
    (tmp_path / "file").write_text("x")
    res = run("analyse", ck, "-o", tmp_path / "file" / "r.h5")
    assert res.exit_code == 2 and "cannot write" in res.output
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as fh:
        fh.attrs["format"], fh.attrs["schema_version"] = "curvscope", 2
    before = digest(newer)
    for args in (["analyse", ck, "-o", newer], ["info", newer], ["render", newer]):
        res = run(*args)
        assert res.exit_code == 2 and "newer" in res.output and "upgrade curvscope" in res.output
    assert digest(newer) == before


def test_info_and_render_refuse_what_is_not_results(tmp_path: Path) -> None:
    for args, message in ((["info", tmp_path / "none.h5"], "does not exist"),
                          (["info", SHIPPED], "not an HDF5"),
                          (["render", tmp_path / "none.h5"], "does not exist")):
        res = run(*args)
        assert res.exit_code == 2 and message in res.output


def test_module_entry_point_prints_one_paragraph_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "curvscope", "analyse", str(tmp_path / "nope.pt")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.startswith("curvscope: error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()


def analyse_plugin_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str):
    """Analyse a fresh state_dict of `net()` from the module `source` (a module name unique to the test)."""
    name = f"plugin_net_{zlib.crc32(str(tmp_path).encode())}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    torch.save(module.net().state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "r.h5"
    return run("analyse", tmp_path / "sd.pt", "--model", f"{name}:net", "--data", "synthetic", "--data-kwargs",
               '{"shape": [12], "num_classes": 3, "n": 20}', "--loss", "nll", "-o", out, "--no-render",
               "--no-spectrum"), out


def test_frozen_and_dead_tensors_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res, out = analyse_plugin_model(tmp_path, monkeypatch, """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(12, 5)
                self.dead = torch.nn.Linear(12, 5)
                self.b = torch.nn.Linear(5, 3)
                self.a.bias.requires_grad_(False)
            def forward(self, x):
                return torch.log_softmax(self.b(torch.tanh(self.a(x)) + 0 * self.dead.bias.sum()), 1)
        def net():
            return Net()
        """)
    assert res.exit_code == 0, res.output
    assert "excluded from the inverse: dead.weight, dead.bias" in res.output
    info = run("info", out).output
    assert "frozen (requires_grad False), left out: a.bias" in info and "excluded from the inverse" in info
    with h5py.File(out) as fh:
        assert "a.bias" not in [n.decode() for n in fh["checkpoints/sd/partition/name"][()]]


def test_nondeterministic_model_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res, _ = analyse_plugin_model(tmp_path, monkeypatch, """
        import torch
        def net():
            class Noisy(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = torch.nn.Linear(12, 3)
                def forward(self, x):
                    return torch.log_softmax(self.fc(torch.nn.functional.dropout(x, 0.5, training=True)), 1)
            return Noisy()
        """)
    assert res.exit_code == 0 and "not deterministic" in res.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_run_exits_130_and_keeps_results(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "r.h5"
    assert run("analyse", write_tiny_bundle(tmp_path / "good.pt"), "-o", out, "--no-render",
               "--no-spectrum").exit_code == 0
    before = digest(out)
    proc = subprocess.Popen([sys.executable, "-m", "curvscope", "analyse", str(SHIPPED), "-o", str(out),
                             "--no-render", "--lanczos-steps", "400"], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=interruptible)
    time.sleep(8)  # imports done, computing
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_attention_model_runs_under_the_math_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nn.MultiheadAttention(need_weights=False) uses a fused kernel without double backward on CPU."""
    res, out = analyse_plugin_model(tmp_path, monkeypatch, """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
                self.head = torch.nn.Linear(4, 3)
            def forward(self, x):
                x = x.view(-1, 3, 4)
                y, _ = self.attn(x, x, x, need_weights=False)
                return torch.log_softmax(self.head(y.mean(1)), 1)
        def net():
            return Net()
        """)
    assert res.exit_code == 0, res.output
    assert "attention (1 module, e.g. attn) ran under PyTorch's math backend" in res.output
    with h5py.File(out) as fh:
        assert "math backend" in fh["checkpoints/sd"].attrs["attention"]


DATA_PLUGINS = {
    "TensorDataset": "torch.utils.data.TensorDataset(x, y)",
    "IterableDataset": "Samples(x, y)",
    "DataLoader": "torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)",
    "list of batches": "[(x[:8], y[:8]), (x[8:], y[8:])]",
}


@pytest.mark.parametrize("kind", sorted(DATA_PLUGINS))
def test_data_plugins_may_return_any_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    name = f"data_plugin_{zlib.crc32(str(tmp_path).encode())}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import torch
        class Samples(torch.utils.data.IterableDataset):
            def __init__(self, x, y):
                self.x, self.y = x, y
            def __iter__(self):
                return iter(zip(self.x, self.y))
        def load(split):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(20, 12, generator=g), torch.randint(0, 3, (20,), generator=g)
            return {DATA_PLUGINS[kind]}
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run("analyse", write_tiny_bundle(tmp_path / "t.pt"), "--data", f"{name}:load", "-o", tmp_path / "r.h5",
              "--no-render", "--no-spectrum")
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "r.h5") as fh:
        assert fh["checkpoints/t"].attrs["n_samples"] == 20
