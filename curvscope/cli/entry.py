"""The `curvscope` console script and `python -m curvscope`: the command line, interruptible at any moment.

Only the standard library is imported before the interrupt handling is in place,
so Ctrl-C (or SIGTERM) while torch is still loading, or while the interpreter
shuts down after the work, exits with 130 and one line instead of a traceback.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

EXIT_INTERRUPTED = 130
MESSAGE = "\ncurvscope: interrupted; results files were left as they were.\n"


def _exit_now(signum: int, frame: Any) -> NoReturn:
    """Leave at once: the work is over (or not begun), and a results file is only ever replaced whole."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, MESSAGE.encode())
    os._exit(EXIT_INTERRUPTED)


def run() -> None:
    """Run the command line; an interrupt before or after the command's own handling exits 130."""
    signal.signal(signal.SIGTERM, _exit_now)  # the command installs its own handler for the work itself
    try:
        from curvscope.cli.main import main

        main(prog_name="curvscope")
    except KeyboardInterrupt:
        _exit_now(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, _exit_now)  # shutting down: no KeyboardInterrupt in atexit or finalisers
        signal.signal(signal.SIGTERM, _exit_now)
