"""Saving figures: vector PDF and PNG, atomically, with reproducibility metadata."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from curvscope import __version__
from curvscope.errors import CurvscopeError

FORMATS = ("pdf", "png")
DPI = 200


def save_figure(fig: Figure, base: Path, description: str) -> list[Path]:
    """Write `fig` to `base`.pdf and `base`.png; each file appears only once complete.

    `description` (what was drawn, from which file) goes into the PDF's Subject
    and the PNG's Description metadata. The files are drawn by matplotlib's own PDF and PNG canvases,
    whatever backend the calling program uses; pyplot is not involved.
    """
    written = []
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CurvscopeError(f"cannot create the figure folder {str(base.parent)!r}: {exc.strerror or exc}.") from None
    for fmt in FORMATS:
        target = base.with_name(f"{base.name}.{fmt}")
        meta = ({"Title": base.name, "Subject": description, "Creator": f"curvscope {__version__}"}
                if fmt == "pdf" else
                {"Title": base.name, "Description": description, "Software": f"curvscope {__version__}"})
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".{fmt}")
        os.close(fd)
        try:
            fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", metadata=meta)
            os.replace(tmp, target)
        except OSError as exc:
            raise CurvscopeError(f"cannot write the figure {str(target)!r}: {exc.strerror or exc}.") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        written.append(target)
    return written
