"""K-FAC under audit: how much of Newton's step survives its two approximations, measured along U.

K-FAC replaces the curvature C (G or F) by K = blockdiag_l(A_l ⊗ B_l): it keeps
C's layer blocks only, and factorises each. With ḡ, C̄ and K̄ = UᵀKU
(:mod:`curvscope.curvature.kfac`), the quadratic model q(η) = ḡᵀη − ½ηᵀC̄η and
Newton's η* = C̄⁻¹ḡ:

- K-FAC's step η_K = K̄⁻¹ḡ (pseudo-inverse when singular) and its efficiency
  e_K = q(η_K)/q(η*), defined when C̄ is positive definite. Beside the layer-block
  step η_L = B_L(C̄)⁻¹ḡ of :mod:`curvscope.measures.interactions`, 1 − e_L is the
  efficiency lost to block-diagonality and e_L − e_K what the Kronecker
  factorisation loses on top (negative when it happens to help);
- the relative deviation r_K = ‖N_C(C̄ − K̄)‖_F / ‖N(C̄)‖_F per part (all,
  weight-weight, bias-bias, weight-bias), in the scale of N(C̄); for a block-diagonal
  approximation it is the off-block ratio;
- per layer l (groups of one module): the Kronecker error
  ‖N_C(C̄_ll − K̄_ll)‖_F / ‖N(C̄_ll)‖_F, and the layer's own efficiency
  q_l(K̄_ll⁻¹ḡ_l)/q_l(C̄_ll⁻¹ḡ_l) with q_l(η) = ḡ_lᵀη − ½ηᵀC̄_llη (NaN unless C̄_ll is
  positive definite): how much of the layer's exact block step K-FAC keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curvscope.measures.interactions import (
    PARTS,
    Step,
    layer_index,
    part_mask,
    quadratic_model,
    relative_deviation,
    with_quality,
)


@dataclass(frozen=True)
class KFACMeasures:
    """The K-FAC step and how far K̄ is from C̄, whole model and per layer."""

    step: Step  # η_K with q(η_K) and e_K
    deviation: np.ndarray  # (len(PARTS),) r_K per part
    layers: np.ndarray  # (L,) str: layer names, in order of first appearance
    layer_rules: np.ndarray  # (L,) str: "linear", "conv2d", "exact" (several joined by "+")
    layer_error: np.ndarray  # (L,) Kronecker error of the layer block
    layer_efficiency: np.ndarray  # (L,) the layer's own step efficiency


def kfac_measures(gbar: np.ndarray, cbar: np.ndarray, inverse: np.ndarray, kbar: np.ndarray, kinds: np.ndarray,
                  layers: np.ndarray, rules: np.ndarray, positive_definite: bool, flavour: str) -> KFACMeasures:
    """The measures of this module from ḡ, C̄, C̄⁻¹ (Newton's step), K̄ and the groups' kinds, layers and rules."""
    eta = np.linalg.pinv(kbar, hermitian=True) @ gbar
    step = with_quality([("newton", "newton", "", inverse @ gbar), (f"k-fac ({flavour})", "kfac", "layer", eta)],
                        gbar, cbar, positive_definite)[1]
    deviation = np.array([relative_deviation(cbar, kbar, part_mask(kinds, p)) for p in PARTS])
    idx = layer_index(layers)
    names, lrules, error, efficiency = [], [], [], []
    for layer in range(int(idx.max()) + 1 if len(idx) else 0):
        ix = np.flatnonzero(idx == layer)
        names.append(str(layers[ix[0]]))
        lrules.append("+".join(dict.fromkeys(str(r) for r in rules[ix])))
        block = np.ix_(ix, ix)
        error.append(relative_deviation(cbar[block], kbar[block]))
        efficiency.append(_block_efficiency(gbar[ix], cbar[block], kbar[block]))
    return KFACMeasures(step, deviation, np.array(names, dtype=str), np.array(lrules, dtype=str),
                        np.array(error), np.array(efficiency))


def _block_efficiency(g: np.ndarray, c: np.ndarray, k: np.ndarray) -> float:
    """q(K⁻¹g)/q(C⁻¹g) under q(η) = gᵀη − ½ηᵀCη; NaN unless C is positive definite and g ≠ 0."""
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(k))) or not np.any(g):
        return float("nan")
    if np.linalg.eigvalsh(0.5 * (c + c.T)).min() <= 0:
        return float("nan")
    best = quadratic_model(np.linalg.solve(c, g), g, c)
    return quadratic_model(np.linalg.pinv(k, hermitian=True) @ g, g, c) / best if best > 0 else float("nan")
