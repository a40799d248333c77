"""Saved figures' permission bits: 0666 less the umask, as for results files (not tempfile.mkstemp's 0600)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from curvscope.figures.output import save_figure


def _line() -> Figure:
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


@pytest.mark.skipif(os.name != "posix", reason="permission bits and the umask are POSIX")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_saved_figures_get_0666_less_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        written = save_figure(_line(), tmp_path / "new" / "f", "a line")
        replaced = save_figure(_line(), tmp_path / "new" / "f", "a line again")  # over the first ones
    finally:
        os.umask(old)
    assert [p.name for p in written] == ["f.pdf", "f.png"] and replaced == written
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {"f.pdf": oct(mode), "f.png": oct(mode)}
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["f.pdf", "f.png"]  # no temporary file left
