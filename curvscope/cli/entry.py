"""The `curvscope` console script and `python -m curvscope`: the command line, interruptible at any moment.

Only the standard library is imported before the interrupt handling is in place,
so Ctrl-C (or SIGTERM) while torch is still loading, or while the interpreter
shuts down after the work, exits with 130 and one line instead of a traceback.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

EXIT_INTERRUPTED = 130
MESSAGE = "\ncurvscope: interrupted; results files were left as they were.\n"


def _exit_now(signum: int, frame: Any) -> NoReturn:
    """Leave at once: the work is over (or not begun), and a results file is only ever replaced whole."""
    _flush()
    os.write(2, MESSAGE.encode())
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def exits_at_once() -> Iterator[None]:
    """Ctrl-C (or SIGTERM) inside this block exits at once (130, one line) instead of raising KeyboardInterrupt.

    For loading libraries (torch, h5py, matplotlib), where nothing is written yet:
    a KeyboardInterrupt raised in their import code may be swallowed by a bare
    except, turned into another error (inside ``__set_name__``), abort the
    process (raised in Python code that C++ called), or, raised in exec'd code
    (dataclasses), make the interpreter kill itself with SIGINT after a clean
    exit. Measured before this block: 8 of 90 interrupted imports of torch.
    """
    previous = {sig: signal.signal(sig, _exit_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _left_a_process_group() -> bool:
    """Whether the command joined a torchrun process group and ended it (read without importing torch)."""
    ranks = sys.modules.get("curvscope.curvature.ranks")
    return ranks is not None and bool(ranks.left())


def run() -> None:
    """Run the command line; an interrupt before or after the command's own handling exits 130.

    A process that ended a torchrun process group exits with its code without finalising the interpreter,
    where gloo's threads may abort it (:func:`curvscope.curvature.ranks.left`)."""
    signal.signal(signal.SIGTERM, _exit_now)  # the command installs its own handler for the work itself
    try:
        with exits_at_once():
            from curvscope.cli.main import main

        main(prog_name="curvscope")
    except KeyboardInterrupt:
        _exit_now(signal.SIGINT, None)
    except SystemExit as done:
        if _left_a_process_group():
            _flush()
            logging.shutdown()
            os._exit(done.code if isinstance(done.code, int) else int(done.code is not None))
        raise
    finally:
        signal.signal(signal.SIGINT, _exit_now)  # shutting down: no KeyboardInterrupt in atexit or finalisers
        signal.signal(signal.SIGTERM, _exit_now)
