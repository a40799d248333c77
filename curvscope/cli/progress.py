"""Progress on stderr: a live line on a terminal, plain lines in a log (a pipe, a file, a batch job).

On a terminal, one line redrawn in place: ``label: stage [####    ] k/n  12.3 s``. Elsewhere, where a
redrawn line would be noise, one line per event, each complete::

    mlp: gradient 0/8 started, 0.0 s
    mlp: pseudo-Hessian 4/8 (50 %), 12.1 s
    mlp: pseudo-Hessian 8/8 done in 23.9 s, 24.2 s in all

A stage's start and end, and between them a line every `interval` seconds (10 by default) and at each
tenth of the stage, at most one a second. A stage that pauses for another (the spectra while their first
product keeps the graphs) goes on without a second "started". Nothing at all when disabled (``-q``).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class ProgressLine:
    """A :data:`~curvscope.curvature.objective.Progress` callback: ``(stage, done, total)`` → stderr.

    A live line when the stream is a terminal, plain lines otherwise (see the module); silent when `enabled`
    is False. `clock` (seconds) is for tests.
    """

    def __init__(self, label: str, enabled: bool = True, stream: TextIO | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.stream = stream or sys.stderr
        tty = _isatty(self.stream)
        self.live = enabled and tty
        self.plain = enabled and not tty
        self.enabled = self.live  # the terminal display (the attribute's meaning before plain lines)
        self.label = label
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self.stage: str | None = None
        self.stage_start = self.start
        self.last_line = self.start  # when the last plain line was written
        self.last_call = self.start  # when the last report came: a new stage's work began then
        self.tenth = 0  # tenths of the current stage already reported
        self.finished = False  # the current stage's end was reported
        self.begun: dict[str, float] = {}  # unfinished stages and when each began: one may pause for another

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.live:
            self._draw(stage, done, total)
        elif self.plain:
            self._log(stage, done, total)

    def _draw(self, stage: str, done: int, total: int) -> None:
        width = 24
        filled = int(width * min(done, total) / max(total, 1))
        elapsed = self.clock() - self.start
        self.stream.write(f"\r{self.label}: {stage:<16s} [{'#' * filled}{' ' * (width - filled)}] "
                          f"{done}/{total}  {elapsed:6.1f} s\x1b[K")
        self.stream.flush()

    def _log(self, stage: str, done: int, total: int) -> None:
        now, since = self.clock(), self.last_call
        self.last_call = now
        if stage != self.stage or (self.finished and done < total):  # a new stage, or the same one again
            resumed = stage in self.begun  # e.g. the spectra, after the graphs their first product builds
            # a stage reported at 0 starts now; one first reported after some work began at the previous report
            self.stage, self.stage_start = stage, self.begun.setdefault(stage, now if done == 0 else since)
            self.tenth, self.finished = (self.tenth, False) if resumed else (0, False)
            if done < total and not resumed:
                self._line(f"{stage} {done}/{total} started", now)
        if self.finished:
            return
        if done >= total:
            self.begun.pop(stage, None)
            self.finished = True
            self._line(f"{stage} {done}/{total} done in {now - self.stage_start:.1f} s", now, in_all=True)
            return
        tenth = 10 * done // max(total, 1)
        due = now - self.last_line >= self.interval
        if due or (tenth > self.tenth and now - self.last_line >= self.interval / 10):
            self.tenth = max(self.tenth, tenth)
            self._line(f"{stage} {done}/{total} ({100 * done // max(total, 1)} %)", now)

    def _line(self, text: str, now: float, in_all: bool = False) -> None:
        self.last_line = now
        elapsed = f"{now - self.start:.1f} s" + (" in all" if in_all else "")
        self.stream.write(f"{self.label}: {text}, {elapsed}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line so that later output starts on a fresh one (plain lines need nothing)."""
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
