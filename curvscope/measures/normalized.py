"""The scale-invariant normalisation N(M) of docs/DESIGN.md §2."""
from __future__ import annotations

import numpy as np


def normalized(matrix: np.ndarray) -> np.ndarray:
    """N(M)_st = M_st / sqrt(|M_ss M_tt|), invariant under rescaling T_s → a_s T_s.

    Rows and columns whose diagonal entry is exactly zero (a group with zero
    gradient) are NaN: no scale-free value exists for them.
    """
    m = np.asarray(matrix, dtype=np.float64)
    d = np.sqrt(np.abs(np.diag(m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = m / np.outer(d, d)
    out[(d == 0)[:, None] | (d == 0)[None, :]] = np.nan
    return out
