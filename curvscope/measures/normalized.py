"""The scale-invariant normalisation N(M) of docs/DESIGN.md §2."""
from __future__ import annotations

import numpy as np


def normalized(matrix: np.ndarray) -> np.ndarray:
    """N(M)_st = M_st / sqrt(|M_ss M_tt|), invariant under rescaling T_s → a_s T_s.

    Rows and columns whose diagonal entry is exactly zero (a group with zero
    gradient) are NaN: no scale-free value exists for them.
    """
    return normalized_by(matrix, matrix)


def normalized_by(matrix: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """N_R(M)_st = M_st / sqrt(|R_ss R_tt|): `matrix` in the scale of `reference` (an approximation of R, or
    its error, made comparable with N(R)); NaN where a diagonal entry of R is zero."""
    m = np.asarray(matrix, dtype=np.float64)
    d = np.sqrt(np.abs(np.diag(np.asarray(reference, dtype=np.float64))))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = m / np.outer(d, d)
    out[(d == 0)[:, None] | (d == 0)[None, :]] = np.nan
    return out
