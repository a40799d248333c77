"""Progress on stderr (issue #16): plain lines where stderr is not a terminal, a live line where it is, nothing
with -q."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_bundle

from curvscope.cli.main import main
from curvscope.cli.progress import ProgressLine


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_start_end_and_every_ten_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressLine("run", stream=out, clock=clock)
    assert bar.plain and not bar.live
    for done in range(1, 1001):  # a slow stage: 1000 batches of 0.05 s
        clock.now += 0.05
        bar("pseudo-Hessian", done, 1000)
    clock.now += 0.5
    bar("spectrum", 4, 4)  # a stage that ends at its first report: one line
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "run: pseudo-Hessian 1/1000 started, 0.1 s"
    assert lines[-2] == "run: pseudo-Hessian 1000/1000 done in 50.0 s, 50.0 s in all"
    assert lines[-1] == "run: spectrum 4/4 done in 0.5 s, 50.5 s in all"
    middle = lines[1:-2]
    assert 5 <= len(middle) <= 10  # every 10 s, and at each tenth once a second has passed: 50 s → 9 lines
    assert "(10 %)" in middle[0] and all(line.startswith("run: pseudo-Hessian ") for line in middle)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_fast_stages_print_only_their_start_and_end() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressLine("t", stream=out, clock=clock)
    for stage in ("gradient", "pseudo-Hessian"):
        for done in range(1, 9):
            clock.now += 0.01
            bar(stage, done, 8)
            bar(stage, done, 8)  # a repeated report adds nothing
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == [
        "t: gradient 1/8 started", "t: gradient 8/8 done in 0.1 s",
        "t: pseudo-Hessian 1/8 started", "t: pseudo-Hessian 8/8 done in 0.1 s"]


def test_a_stage_reported_at_zero_is_timed_from_that_report() -> None:
    """Loading took 5 s before the gradient's 0/2: its "done in" counts from there, not from the start."""
    out, clock = io.StringIO(), Clock()
    bar = ProgressLine("t", stream=out, clock=clock)
    clock.now = 5.0
    bar("gradient", 0, 2)
    for done in (1, 2):
        clock.now += 0.25
        bar("gradient", done, 2)
    assert out.getvalue().splitlines()[-1] == "t: gradient 2/2 done in 0.5 s, 5.5 s in all"


def test_a_stage_that_pauses_for_another_goes_on_without_starting_again() -> None:
    """The spectra report 0/9, then their first product keeps the graphs (a stage of its own), then the
    spectra go on: one "started" line for them, and their time counts from their own start."""
    out, clock = io.StringIO(), Clock()
    bar = ProgressLine("t", stream=out, clock=clock)
    bar("spectrum", 0, 9)
    for done in (2, 3):
        clock.now += 1.0
        bar("graphs", done, 3)
    for done in range(10):
        clock.now += 1.0
        bar("spectrum", done, 9)
    lines = [line.split(",")[0] for line in out.getvalue().splitlines()]
    assert lines[:3] == ["t: spectrum 0/9 started", "t: graphs 2/3 started", "t: graphs 3/3 done in 2.0 s"]
    assert sum("started" in line for line in lines) == 2 and lines[-1] == "t: spectrum 9/9 done in 12.0 s"
    bar("spectrum", 0, 9)  # a new spectrum (the next curvature) starts again
    assert out.getvalue().splitlines()[-1].startswith("t: spectrum 0/9 started")


def test_a_terminal_gets_the_live_line_and_quiet_gets_nothing() -> None:
    tty = Terminal()
    bar = ProgressLine("t", stream=tty)
    assert bar.live and not bar.plain
    bar("gradient", 3, 8)
    bar.close()
    assert tty.getvalue().startswith("\rt: gradient") and "3/8" in tty.getvalue() and "\n" not in tty.getvalue()
    for stream in (io.StringIO(), Terminal()):
        quiet = ProgressLine("t", enabled=False, stream=stream)
        quiet("gradient", 3, 8)
        quiet.close()
        assert stream.getvalue() == ""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("progress") / "tiny.pt")


def test_analyse_logs_progress_lines_when_stderr_is_not_a_terminal(bundle: Path, tmp_path: Path) -> None:
    args = ["analyse", str(bundle), "--no-spectrum", "--no-render", "--batch-size", "16"]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.h5")])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert "tiny: gradient 0/3 started" in lines[0]  # reported when the work starts, not after a batch
    assert any(line.startswith("tiny: pseudo-Hessian 3/3 done in ") for line in lines), lines
    assert all(line.startswith("tiny: ") for line in lines) and "\r" not in res.stderr
    assert "S=4 groups" in res.stdout  # the summary stays on stdout
    quiet = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "q.h5"), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.output


def test_layers_is_a_scale_of_both_commands(tmp_path: Path) -> None:
    for command in ("render", "analyse"):
        res = CliRunner().invoke(main, [command, str(tmp_path / "missing"), "--scale", "layers"])
        assert res.exit_code == 2 and "does not exist" in res.output, res.output  # not an invalid --scale


def test_spectra_report_every_product() -> None:
    """A long Lanczos run is one step of the spectrum stage: each product is reported (with the same step
    count), so that the plain log still gets its line every 10 s during the run."""
    from conftest import make_case

    from curvscope.curvature.registry import curvature_operator
    from curvscope.curvature.spectrum import spectrum

    case = make_case("mlp")
    calls: list[tuple[str, int, int]] = []
    with curvature_operator(case.model, case.loss_fn, case.batches()) as op:
        result = spectrum(op, k=2, max_steps=10, slq_steps=10, trace_matvecs=6, blocks="off",
                          progress=lambda *c: calls.append(c))
    assert len(calls) >= result.products  # one report per product, plus the steps' own
    assert {stage for stage, _, _ in calls} == {calls[0][0]} and calls[0][0].startswith("spectrum (vectors:")
    assert calls[-1][1] == calls[-1][2]  # the stage ends done
