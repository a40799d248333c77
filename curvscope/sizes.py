"""Sizes in bytes as people read them."""
from __future__ import annotations


def format_bytes(n: int | float) -> str:
    """`n` bytes in binary units with three significant figures: 512 B, 1.00 KiB, 30.5 MiB, 14.4 GiB."""
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{int(size)} B" if unit == "B" else f"{size:.3g} {unit}"
