"""The harness of the hostile-input corpus: one case is a command line that must fail cleanly.

A case runs the CLI in-process and asserts what issue #13 asks of every hostile input:
the expected exit code (2: bad input), a one-paragraph ``curvscope: error:`` message and no
traceback, no marker file (no code from a file ran), and every protected file byte for byte
as it was. Case generators live in the ``hostile_*.py`` modules beside this one; each takes a
folder to write its inputs into and returns a list of cases. ``test_hostile.py`` collects them.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner
from conftest import write_tiny_bundle

from curvscope.cli.main import main

#: Crafted files that try to run code make this file; its existence after a case is a failure.
MARKER_NAME = "PWNED"
#: Options that make every analysis of the tiny bundle fast.
QUICK = ["--no-render", "--no-spectrum", "-q"]


@dataclass
class HostileCase:
    """One hostile command line and what it must (not) do."""

    id: str
    args: list[str]  # the arguments after `curvscope`
    message: str = ""  # a regular expression the error message must match ("" for any)
    expect: int | tuple[int, ...] = 2  # the exit code, or the codes allowed (a bit flip may leave a file usable)
    protect: list[Path] = field(default_factory=list)  # files that must be byte-identical afterwards
    marker: Path | None = None  # a file that code smuggled into the input would create


def existing_results(tmp: Path) -> Path:
    """A results file made before the hostile runs; every refused run must leave it byte for byte as it was."""
    out = tmp / "existing.h5"
    if not out.exists():
        res = CliRunner().invoke(main, ["analyse", str(write_tiny_bundle(tmp / "good.pt")), "-o", str(out), *QUICK])
        assert res.exit_code == 0, res.output
    return out


def flipped(raw: bytes, seed: int) -> bytes:
    """`raw` with 1 to 4 bits flipped (1 + seed % 4) at places drawn from `seed`."""
    rng, data = random.Random(seed), bytearray(raw)
    for _ in range(1 + seed % 4):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "<absent>"


def check(case: HostileCase) -> None:
    """Run `case` and assert every property of a clean refusal."""
    before = {p: digest(p) for p in case.protect}
    res = CliRunner().invoke(main, [str(a) for a in case.args])
    out = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"{case.id}: escaped {type(res.exception).__name__}: {res.exception}\n{out}"
    allowed = case.expect if isinstance(case.expect, tuple) else (case.expect,)
    assert res.exit_code in allowed, f"{case.id}: exit {res.exit_code}, expected {case.expect}\n{out}"
    assert "Traceback" not in out, f"{case.id}: traceback\n{out}"
    if res.exit_code == 2:
        errors = [line for line in out.splitlines() if line.startswith("curvscope: error:")]
        assert len(errors) == 1, f"{case.id}: expected one error paragraph\n{out}"
        paragraph = out[out.index("curvscope: error:"):].rstrip("\n")
        assert "\n\n" not in paragraph, f"{case.id}: the message is not one paragraph\n{out}"
        flat = " ".join(paragraph.split())  # the paragraph is wrapped to the terminal's width
        assert re.search(case.message, flat), f"{case.id}: message does not match {case.message!r}\n{out}"
        for foreign in ("weights_only=False", "allow_pickle=True", "re-running"):
            assert foreign not in paragraph, f"{case.id}: the message repeats advice that is not curvscope's\n{out}"
    if case.marker is not None:
        assert not case.marker.exists(), f"{case.id}: code from the input ran (marker {case.marker} exists)"
    for path, sha in before.items():
        assert digest(path) == sha, f"{case.id}: {path} changed"
