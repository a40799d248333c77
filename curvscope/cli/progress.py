"""A one-line progress display on stderr, shown only on a terminal."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """A :data:`~curvscope.curvature.objective.Progress` callback drawing ``label stage [###  ] k/n``.

    Silent when `enabled` is False or the stream is not a terminal (a pipe, a log file).
    """

    def __init__(self, label: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label}: {stage:<16s} [{'#' * filled}{' ' * (width - filled)}] "
                          f"{done}/{total}  {elapsed:6.1f} s\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """End the line so that later output starts on a fresh one."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
