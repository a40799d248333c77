"""An exclusive lock per results file, so that concurrent writers take turns.

The lock is ``flock`` on a sidecar file ``.<name>.lock`` beside the results file. Its
holder removes it on release while still holding the lock; a waiter that then gets the
lock on the removed file notices (the path no longer names the file it locked) and tries
again, so the file is never deleted from under a holder and never left behind.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def lock_path(path: Path) -> Path:
    """The sidecar lock file of the results file `path`."""
    return path.with_name(f".{path.name}.lock")


def _still_named(fd: int, sidecar: Path) -> bool:
    """Whether `sidecar` still names the file open as `fd` (its holder removes it on release)."""
    try:
        st = os.stat(sidecar)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _open(sidecar: Path) -> int:
    """Open (creating) the lock file; read-only when another user's lock file is not writable to us."""
    try:
        return os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        return os.open(sidecar, os.O_RDONLY | os.O_CLOEXEC)


def _acquire(sidecar: Path, wait: Callable[[], None]) -> int:
    """An open descriptor of `sidecar` holding its exclusive lock; `wait` is called before any blocking."""
    while True:
        fd = _open(sidecar)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _still_named(fd, sidecar):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file its holder had removed: try the one now there


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of the results file `path`; when another process holds it, call
    `on_wait` once with a message saying so, then wait for it."""
    sidecar = lock_path(path)
    told = False

    def wait() -> None:
        nonlocal told
        if on_wait is not None and not told:
            on_wait(f"waiting for another curvscope process writing {path.name}")
        told = True

    fd = _acquire(sidecar, wait)
    try:
        yield
    finally:
        try:
            os.unlink(sidecar)
        except OSError:
            pass  # left behind: the next writer reuses it
        os.close(fd)  # releases the lock
