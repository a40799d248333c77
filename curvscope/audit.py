"""The block-diagonal audit: is a per-layer (or per-tensor) curvature approximation valid here?

Made from a stored results file alone. For each approximation A (``layer`` or
``tensor`` blocks) of M ∈ {H̄ (``hessian``), H̄⁻¹ (``inverse``)}: valid when
the step efficiency e = q(η_A)/q* ≥ 1 − tolerance; when e is undefined (H̄ not
positive definite), when the off-block ratio r_A(M) ≤ tolerance. The rule
that decided is reported with the verdict.

JSON (``format: "curvscope-audit"``, ``version: 1``; NaN is written as null)::

    {"format", "version", "tolerance", "valid",
     "checkpoints": [{"label", "results", "source", "positive_definite", "efficiency",
                      "significant_pairs", "pairs", "valid",
                      "newton": {"predicted_decrease", "actual_decrease"},
                      "cauchy": {"predicted_decrease", "actual_decrease", "efficiency"},
                      "approximations": [{"approximation", "of", "off_block_ratio": {part: r},
                                          "efficiency", "predicted_decrease", "actual_decrease",
                                          "rule", "valid"}]}]}
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import GROUPINGS, PARTS
from curvscope.store.hdf5 import StoredCheckpoint

FORMAT, VERSION = "curvscope-audit", 1
MATRICES = ("hessian", "inverse")


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _step(ck: StoredCheckpoint, kind: str, grouping: str = "") -> dict:
    kinds, groupings = ck["interactions/steps/kind"], ck["interactions/steps/grouping"]
    i = int(np.flatnonzero((kinds == kind) & (groupings == grouping))[0])
    return {"predicted_decrease": _num(ck["interactions/steps/predicted_decrease"][i]),
            "actual_decrease": _num(ck["interactions/steps/actual_decrease"][i]),
            "efficiency": _num(ck["interactions/steps/efficiency"][i])}


def audit_checkpoint(ck: StoredCheckpoint, results: Path, approximations: Sequence[str], of: Sequence[str],
                     tolerance: float) -> dict:
    """The verdicts for one stored checkpoint (the JSON structure of this module, one element)."""
    if "interactions/steps/efficiency" not in ck.data:
        raise CurvscopeError(f"checkpoint {ck.label!r} of {str(results)!r} holds no interactions/ group "
                             f"(written by an older curvscope?): analyse it again with --overwrite.")
    pd = bool(ck.data_attrs.get("interactions", {}).get("positive_definite", False))
    rows = []
    for grouping in approximations:
        for matrix in of:
            ratios = ck[f"interactions/{matrix}/off_block_ratio"][GROUPINGS.index(grouping)]
            step = _step(ck, matrix, grouping)
            eff = step["efficiency"]
            if eff is not None:
                rule, valid = f"efficiency >= {1 - tolerance:g}", eff >= 1 - tolerance
            else:
                rule, valid = f"off-block ratio <= {tolerance:g} (efficiency undefined)", \
                    bool(np.nan_to_num(ratios[0], nan=np.inf) <= tolerance)
            rows.append({"approximation": grouping, "of": matrix,
                         "off_block_ratio": {p: _num(r) for p, r in zip(PARTS, ratios)},
                         "efficiency": eff, "predicted_decrease": step["predicted_decrease"],
                         "actual_decrease": step["actual_decrease"], "rule": rule, "valid": bool(valid)})
    S = len(ck["pseudo_gradient"])
    newton = _step(ck, "newton")
    del newton["efficiency"]
    return {"label": ck.label, "results": str(results), "source": ck.attrs.get("source"),
            "positive_definite": pd,
            "efficiency": "defined" if pd else "undefined: H̄ indefinite",
            "significant_pairs": int(ck["interactions/significant_count"]), "pairs": S * (S - 1) // 2,
            "newton": newton, "cauchy": _step(ck, "cauchy"), "approximations": rows,
            "valid": all(r["valid"] for r in rows)}


def audit_report(checkpoints: list[dict], tolerance: float) -> dict:
    """The whole JSON document."""
    return {"format": FORMAT, "version": VERSION, "tolerance": tolerance,
            "valid": all(c["valid"] for c in checkpoints), "checkpoints": checkpoints}


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def format_report(report: dict) -> str:
    """The human-readable table per checkpoint and a summary line."""
    lines = []
    for c in report["checkpoints"]:
        sig = ("standard errors unknown (one batch)" if c["significant_pairs"] < 0 else
               f"{c['significant_pairs']} of {c['pairs']} off-diagonal pairs of H̄ exceed 2 standard errors")
        lines.append(f"[{c['label']}] H̄ {'positive definite' if c['positive_definite'] else 'not positive definite'} "
                     f"(efficiency {c['efficiency']}); {sig}")
        n, ca = c["newton"], c["cauchy"]
        lines.append(f"  Newton step: predicted decrease {_fmt(n['predicted_decrease'])}, actual "
                     f"{_fmt(n['actual_decrease'])}; Cauchy step: efficiency {_fmt(ca['efficiency'])}, "
                     f"predicted {_fmt(ca['predicted_decrease'])}, actual {_fmt(ca['actual_decrease'])}")
        head = (f"  {'approximation':14s} {'of':8s} {'r(all)':>7s} {'r(WW)':>7s} {'r(BB)':>7s} {'r(WB)':>7s} "
                f"{'effic.':>7s} {'predicted':>10s} {'actual':>10s}  verdict (rule)")
        lines.append(head)
        for r in c["approximations"]:
            rr = [_fmt(r["off_block_ratio"][p], ".3f") for p in PARTS]
            lines.append(f"  {r['approximation'] + ' blocks':14s} {r['of']:8s} {rr[0]:>7s} {rr[1]:>7s} {rr[2]:>7s} "
                         f"{rr[3]:>7s} {_fmt(r['efficiency'], '.3f'):>7s} {_fmt(r['predicted_decrease']):>10s} "
                         f"{_fmt(r['actual_decrease']):>10s}  {'valid' if r['valid'] else 'NOT VALID'} ({r['rule']})")
    rows = [r for c in report["checkpoints"] for r in c["approximations"]]
    good = sum(r["valid"] for r in rows)
    lines.append(f"summary: {good} of {len(rows)} approximations valid at tolerance {report['tolerance']:g} "
                 f"over {len(report['checkpoints'])} checkpoint(s): "
                 f"{'all valid' if report['valid'] else 'NOT all valid'}")
    return "\n".join(lines)
