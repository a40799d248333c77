"""Saving figures: vector PDF and PNG, atomically, with reproducibility metadata."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from curvscope import __version__
from curvscope.errors import CurvscopeError
from curvscope.store.atomic import create_temporary

FORMATS = ("pdf", "png")
DPI = 200
PAD = 0.1  # inches of white around the tight bounding box
MAX_PIXELS = 4000  # a PNG's width and height at most; larger figures are drawn at a lower resolution
MAX_INCHES = 0.98 * MAX_PIXELS / DPI - 2 * PAD - 0.01  # what figures are sized within: their PNGs keep the DPI


def png_dpi(fig: Figure) -> float:
    """The resolution of `fig`'s PNG: DPI, or less when `fig` (with its padding) is over MAX_PIXELS at DPI."""
    return min(DPI, 0.98 * MAX_PIXELS / (float(max(fig.get_size_inches())) + 2 * PAD))


def save_figure(fig: Figure, base: Path, description: str) -> list[Path]:
    """Write `fig` to `base`.pdf and `base`.png; each file appears only once complete.

    `description` (what was drawn, from which file) goes into the PDF's Subject
    and the PNG's Description metadata. The PNG is at most MAX_PIXELS wide and high (:func:`png_dpi`).
    The files are drawn by matplotlib's own PDF and PNG canvases,
    whatever backend the calling program uses; pyplot is not involved.
    Each file gets mode 0666 less the umask, as results files do (a replaced figure too), so that whoever
    may read the folder's other new files may read the figures.
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
        try:
            fd, tmp = create_temporary(target.parent, target.name)  # 0666 less the umask, unlike mkstemp's 0600
            os.close(fd)
            try:
                fig.savefig(tmp, format=fmt, dpi=png_dpi(fig) if fmt == "png" else DPI, bbox_inches="tight",
                            pad_inches=PAD, metadata=meta)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise CurvscopeError(f"cannot write the figure {str(target)!r}: {exc.strerror or exc}.") from None
        written.append(target)
    return written
