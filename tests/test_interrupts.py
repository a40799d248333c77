"""Ctrl-C at any moment: while torch loads, during the work and while the interpreter shuts down."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import ROOT, SHIPPED, interruptible, write_tiny_bundle

from curvscope.cli.main import main

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _results(tmp_path: Path) -> Path:
    out = tmp_path / "r.h5"
    res = CliRunner().invoke(main, ["analyse", str(write_tiny_bundle(tmp_path / "t.pt")), "-o", str(out),
                                    "--no-render", "--no-spectrum", "-q"])
    assert res.exit_code == 0, res.output
    return out


def _interrupt(args: list[str], delay: float, cwd: Path, wait_for: str | None = None,
               stream: str = "stdout") -> tuple[int, str]:
    """Start `python args`, send SIGINT after `delay` s (counted from `wait_for` on `stream` when given)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    if wait_for is not None:
        lines = getattr(proc, stream)
        while wait_for not in lines.readline():
            pass
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_interrupt_while_torch_loads(tmp_path: Path) -> None:
    out = _results(tmp_path)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    for delay in (0.1, 0.5):  # counted from the interpreter's first import; torch takes seconds to import
        code, err = _interrupt(["-X", "importtime", "-m", "curvscope", "analyse", str(SHIPPED), "-o", str(out),
                                "--overwrite"], delay, tmp_path, wait_for="import time:", stream="stderr")
        assert code == 130, err
        assert "interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_interrupt_while_shutting_down(tmp_path: Path) -> None:
    """After the command is done, an exit handler (as libraries register) is still running: exit 130, no traceback."""
    out = _results(tmp_path)
    script = tmp_path / "slow_exit.py"
    script.write_text("import atexit, sys, time\n"
                      "atexit.register(time.sleep, 30)\n"
                      "sys.argv = ['curvscope', 'info', sys.argv[1]]\n"
                      "from curvscope.cli.entry import run\n"
                      "run()\n")
    code, err = _interrupt([str(script), str(out)], 1.0, tmp_path, wait_for="datasets:")
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
