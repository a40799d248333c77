"""The block-diagonal audit: is a per-layer (or per-tensor) curvature approximation valid here?

Made from a stored results file alone, for whichever curvature C each stored
record holds (the Hessian H, the GGN G or the empirical Fisher F). For each
approximation A (``layer`` or ``tensor`` blocks) of M ∈ {C̄ (``matrix``), C̄⁻¹
(``inverse``)}: valid when the step efficiency e = q(η_A)/q* ≥ 1 − tolerance;
when e is undefined (C̄ not positive definite), when the off-block ratio
r_A(M) ≤ tolerance. The rule that decided is reported with the verdict, and
the verdict names the matrix.

``kfac`` (for GGN and Fisher records; K-FAC does not approximate the Hessian) audits
K-FAC's K̄ (:mod:`curvscope.measures.kfac`) as an approximation of the matrix:
its efficiency e_K = q(η_K)/q*, else its deviation ratio r_K (the off-block
ratio's generalisation, in ``off_block_ratio``). Its row adds ``flavour``,
``kfac_approximation`` (expand or reduce) and the decomposition
1 − e_K = ``lost_to_blocks`` (1 − e_L, e_L the exact layer blocks' efficiency)
+ ``lost_to_kronecker`` (e_L − e_K). A GGN or Fisher record without a stored
K-FAC gets an "undefined" row saying why.

JSON (``format: "curvscope-audit"``, ``version: 2``; NaN and infinities are written as null)::

    {"format", "version", "tolerance", "valid",
     "checkpoints": [{"label", "results", "source", "curvature", "matrix", "positive_definite", "efficiency",
                      "significant_pairs", "pairs", "valid",
                      "newton": {"predicted_decrease", "actual_decrease"},
                      "cauchy": {"predicted_decrease", "actual_decrease", "efficiency"},
                      "approximations": [{"approximation", "of", "off_block_ratio": {part: r},
                                          "efficiency", "predicted_decrease", "actual_decrease",
                                          "rule", "verdict", "valid",
                                          kfac only: "flavour", "kfac_approximation", "lost_to_blocks",
                                          "lost_to_kronecker"}]}]}

``curvature`` is "hessian", "ggn" or "fisher" and ``matrix`` its symbol (H̄, Ḡ, F̄); ``of`` is
"matrix" or "inverse" (version 1 said "hessian" for "matrix" and had neither ``curvature`` nor
``matrix`` nor ``verdict``). ``verdict`` is "valid", "not valid" or "undefined" (neither the
efficiency nor the off-block ratio is defined, e.g. when a diagonal entry of C̄ is zero);
``valid`` is true only for "valid", and the exit code is 0 only when every verdict is.
"""
from __future__ import annotations

import math
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from curvscope.curvature.kinds import KFAC_FLAVOUR_OF, curvature_kind, stored_kind
from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import GROUPINGS, PARTS
from curvscope.store.hdf5 import StoredCheckpoint

FORMAT, VERSION = "curvscope-audit", 2
MATRICES = ("matrix", "inverse")
STORED = {"matrix": "hessian", "inverse": "inverse"}  # their names in the results file's interactions/ group
VALID, NOT_VALID, UNDEFINED = "valid", "not valid", "undefined"
KFAC = "kfac"
APPROXIMATIONS = (*GROUPINGS, KFAC)


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None  # JSON has no NaN or infinity


def _step(ck: StoredCheckpoint, kind: str, grouping: str = "") -> dict:
    kinds, groupings = ck["interactions/steps/kind"], ck["interactions/steps/grouping"]
    i = int(np.flatnonzero((kinds == kind) & (groupings == grouping))[0])
    return {"predicted_decrease": _num(ck["interactions/steps/predicted_decrease"][i]),
            "actual_decrease": _num(ck["interactions/steps/actual_decrease"][i]),
            "efficiency": _num(ck["interactions/steps/efficiency"][i])}


def _positive_definite(ck: StoredCheckpoint) -> bool:
    """Whether H̄ is positive definite: the stored flag, confirmed on the stored matrix (a NaN H̄ never is)."""
    h = np.asarray(ck["pseudo_hessian"], dtype=np.float64)
    if not (bool(ck.data_attrs.get("interactions", {}).get("positive_definite", False)) and np.isfinite(h).all()):
        return False
    kept = np.asarray(ck["pseudo_gradient"]) != 0  # groups with zero gradient are excluded from the inverse
    return bool(kept.any() and np.linalg.eigvalsh(0.5 * (h + h.T)[np.ix_(kept, kept)]).min() > 0)


def audit_checkpoint(ck: StoredCheckpoint, results: Path, approximations: Sequence[str], of: Sequence[str],
                     tolerance: float) -> dict:
    """The verdicts for one stored checkpoint (the JSON structure of this module, one element)."""
    if "interactions/steps/efficiency" not in ck.data:
        raise CurvscopeError(f"checkpoint {ck.label!r} of {str(results)!r} holds no interactions/ group "
                             f"(written by an older curvscope?): analyse it again with --overwrite.")
    pd = _positive_definite(ck)
    rows = []
    for grouping in approximations:
        if grouping == KFAC:
            rows += _kfac_rows(ck, pd, tolerance)
            continue
        for matrix in of:
            ratios = ck[f"interactions/{STORED[matrix]}/off_block_ratio"][GROUPINGS.index(grouping)]
            step = _step(ck, STORED[matrix], grouping)
            rows.append(_row(grouping, matrix, ratios, step, pd, tolerance))
    S = len(ck["pseudo_gradient"])
    newton = _step(ck, "newton")
    del newton["efficiency"]
    kind = stored_kind(ck.attrs)
    return {"label": ck.label, "results": str(results), "source": ck.attrs.get("source"),
            "curvature": kind.name, "matrix": kind.bar,
            "positive_definite": pd,
            "efficiency": "defined" if pd else f"undefined: {kind.bar} not positive definite",
            "significant_pairs": int(ck["interactions/significant_count"]), "pairs": S * (S - 1) // 2,
            "newton": newton, "cauchy": _step(ck, "cauchy"), "approximations": rows,
            "valid": all(r["valid"] for r in rows)}


def _row(approximation: str, matrix: str, ratios: np.ndarray, step: dict, pd: bool, tolerance: float) -> dict:
    """One approximation's row: valid when its efficiency is at least 1 − tolerance or, when the efficiency is
    undefined, when its (off-block) deviation ratio over all entries is at most the tolerance."""
    eff = step["efficiency"] if pd else None
    if eff is not None:
        rule, verdict = f"efficiency >= {1 - tolerance:g}", VALID if eff >= 1 - tolerance else NOT_VALID
    elif math.isfinite(ratios[0]):
        rule = f"off-block ratio <= {tolerance:g}, as the efficiency is undefined"
        verdict = VALID if ratios[0] <= tolerance else NOT_VALID
    else:
        rule, verdict = "efficiency and off-block ratio undefined: a diagonal entry of the matrix is zero " \
            "or not finite", UNDEFINED
    return {"approximation": approximation, "of": matrix,
            "off_block_ratio": {p: _num(r) for p, r in zip(PARTS, ratios)}, "efficiency": eff,
            "predicted_decrease": step["predicted_decrease"], "actual_decrease": step["actual_decrease"],
            "rule": rule, "verdict": verdict, "valid": verdict == VALID}


def _kfac_rows(ck: StoredCheckpoint, pd: bool, tolerance: float) -> list[dict]:
    """K-FAC's row for a GGN or Fisher record (none for the Hessian, which K-FAC does not approximate), with
    the efficiency lost to the layer blocks (1 − e_L) and, on top, to the Kronecker factors (e_L − e_K)."""
    if stored_kind(ck.attrs).name not in KFAC_FLAVOUR_OF:
        return []
    if "interactions/kfac/efficiency" not in ck.data:
        why = ck.attrs.get("kfac_note") or ("no K-FAC is stored (analysed with --kfac off, or by an older "
                                            "curvscope): analyse again with --overwrite")
        return [{"approximation": KFAC, "of": "matrix", "off_block_ratio": dict.fromkeys(PARTS),
                 "efficiency": None, "predicted_decrease": None, "actual_decrease": None, "rule": why,
                 "verdict": UNDEFINED, "valid": False, "flavour": None, "kfac_approximation": None,
                 "lost_to_blocks": None, "lost_to_kronecker": None}]
    attrs = ck.data_attrs["interactions/kfac"]
    step = {key: _num(float(ck[f"interactions/kfac/{key}"])) for key in ("predicted_decrease", "actual_decrease",
                                                                   "efficiency")}
    row = _row(KFAC, "matrix", ck["interactions/kfac/deviation_ratio"], step, pd, tolerance)
    row["rule"] = row["rule"].replace("off-block ratio", "deviation ratio")
    blocks = _step(ck, "hessian", "layer")["efficiency"] if pd else None
    kfac = row["efficiency"]
    return [{**row, "flavour": str(attrs["flavour"]), "kfac_approximation": str(attrs["approximation"]),
             "lost_to_blocks": None if blocks is None else 1 - blocks,
             "lost_to_kronecker": None if blocks is None or kfac is None else blocks - kfac}]


def audit_report(checkpoints: list[dict], tolerance: float) -> dict:
    """The whole JSON document."""
    return {"format": FORMAT, "version": VERSION, "tolerance": tolerance,
            "valid": all(c["valid"] for c in checkpoints), "checkpoints": checkpoints}


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "undefined" if x is None else format(x, spec)


def format_report(report: dict) -> str:
    """The human-readable table per checkpoint and a summary line."""
    lines = []
    for c in report["checkpoints"]:
        bar = c["matrix"]
        sig = ("standard errors unknown (one batch)" if c["significant_pairs"] < 0 else
               f"{c['significant_pairs']} of {c['pairs']} off-diagonal pairs of {bar} exceed 2 standard errors")
        lines.append(f"[{c['label']}] {bar} ({curvature_kind(c['curvature']).title}) "
                     f"{'positive definite' if c['positive_definite'] else 'not positive definite'} "
                     f"(efficiency {c['efficiency'].split(':')[0]}); {sig}")
        n, ca = c["newton"], c["cauchy"]
        lines.append(f"  Newton step: predicted decrease {_fmt(n['predicted_decrease'])}, actual "
                     f"{_fmt(n['actual_decrease'])}; Cauchy step: efficiency {_fmt(ca['efficiency'])}, "
                     f"predicted {_fmt(ca['predicted_decrease'])}, actual {_fmt(ca['actual_decrease'])}")
        if not c["approximations"]:
            lines.append(f"  nothing to audit: K-FAC approximates the GGN or the Fisher, not the "
                         f"{curvature_kind(c['curvature']).title}")
            continue
        head = (f"  {'approximation':14s} {'of':8s} {'r(all)':>9s} {'r(WW)':>9s} {'r(BB)':>9s} {'r(WB)':>9s} "
                f"{'effic.':>9s} {'predicted':>10s} {'actual':>10s}  verdict (rule: valid when)")
        lines.append(head)
        for r in c["approximations"]:
            rr = [_fmt(r["off_block_ratio"][p], ".3f") for p in PARTS]
            verdict = r["verdict"] if r["verdict"] == VALID else r["verdict"].upper()
            of = bar if r["of"] == "matrix" else bar + "⁻¹"
            of += " " * (8 - sum(not unicodedata.combining(ch) for ch in of))  # a combining bar takes no column
            name = (f"K-FAC {r['flavour'] or ''}".strip() if r["approximation"] == KFAC
                    else r["approximation"] + " blocks")
            why = r["rule"] if r["verdict"] == UNDEFINED else f"rule: {r['rule']}"
            lines.append(f"  {name:14s} {of} {rr[0]:>9s} {rr[1]:>9s} {rr[2]:>9s} "
                         f"{rr[3]:>9s} {_fmt(r['efficiency'], '.3f'):>9s} {_fmt(r['predicted_decrease']):>10s} "
                         f"{_fmt(r['actual_decrease']):>10s}  {verdict} ({why})")
        lines += [f"  K-FAC ({r['flavour']}, {r['kfac_approximation']}): efficiency {r['efficiency']:.3f} = 1 − "
                  f"{r['lost_to_blocks']:.3f} lost to the layer blocks − {r['lost_to_kronecker']:.3f} lost to the "
                  f"Kronecker factors" for r in c["approximations"]
                  if r["approximation"] == KFAC and r["lost_to_kronecker"] is not None]
    rows = [r for c in report["checkpoints"] for r in c["approximations"]]
    good = sum(r["valid"] for r in rows)
    undefined = sum(r["verdict"] == UNDEFINED for r in rows)
    lines.append(f"summary: {good} of {len(rows)} approximations valid"
                 f"{f' ({undefined} undefined)' if undefined else ''} at tolerance {report['tolerance']:g} "
                 f"over {len(report['checkpoints'])} checkpoint(s): "
                 f"{'all valid' if report['valid'] else 'NOT all valid'}")
    return "\n".join(lines)
