"""Replace a file with new bytes all at once, or not at all.

The bytes go to a temporary file beside the target with plain ``os.write`` calls (so a full
disk is an ``OSError``, not a crash inside a C library), are flushed to disk, and only then
renamed over the target. On any failure the temporary file is removed and the target is
as it was. A replaced file keeps its permission bits; a new one gets 0666 less the umask.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty, exclusively created hidden file in `folder` (mode 0666 less the umask)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: some file systems cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Make `path` hold exactly `data`; raises OSError (e.g. ENOSPC) with `path` untouched."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = create_temporary(path.parent, path.name)
    try:
        try:
            _write_all(fd, data)
            if mode is not None:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
