"""The HDF5 results file, schema version 1 (DESIGN.md §3; declared in :mod:`curvscope.store.schema`).

Reading goes through one validating reader (:mod:`curvscope.store.reader`): nothing uses a
file's data before its whole layout has been checked. Writing holds the file's lock
(:mod:`curvscope.store.lock`), builds the new file in memory from the old one and the new
records, and replaces the file at once (:mod:`curvscope.store.atomic`), so concurrent
writers lose nothing and a failed or interrupted write leaves the old file as it was.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from curvscope import __version__
from curvscope.curvature.kinds import stored_kind
from curvscope.errors import CurvscopeError
from curvscope.measures.cubic import SINGULAR_THRESHOLD
from curvscope.measures.interactions import GROUPINGS, PARTS, SIGNIFICANCE
from curvscope.measures.normalized import normalized
from curvscope.store.atomic import replace_file
from curvscope.store.lock import exclusive_lock
from curvscope.store.reader import ResultsFile, StoredCheckpoint, parse
from curvscope.store.schema import FORMAT, NAME_PATTERN, SCHEMA_VERSION

if TYPE_CHECKING:
    from curvscope.analysis import AnalysisRecord
    from curvscope.measures.interactions import Interactions
    from curvscope.results import EigenResult, KFACResult, Order3Result, SpectrumResult, TraceResult

__all__ = ["FORMAT", "SCHEMA_VERSION", "ResultsFile", "StoredCheckpoint", "check_label", "check_writable", "describe",
           "model_notes", "open_results", "read_results", "record_warnings", "stored_labels",
           "stored_parts", "write_records"]

STR = h5py.string_dtype()


def _cannot_write(path: Path, exc: OSError) -> CurvscopeError:
    return CurvscopeError(f"cannot write the results file {str(path)!r}: {exc.strerror or exc}; "
                          f"it was left as it was.")


def _read_bytes(path: Path) -> bytes:
    """The bytes of the results file `path`, refusing what is missing or not a file."""
    if not path.exists():
        raise CurvscopeError(f"results file {str(path)!r} does not exist.")
    if path.is_dir():
        raise CurvscopeError(f"results file {str(path)!r} is a folder, not a file.")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CurvscopeError(f"cannot read the results file {str(path)!r}: {exc.strerror or exc}.") from None


def open_results(path: Path) -> ResultsFile:
    """The results file `path`, read whole and checked against the schema.

    Refuses, with a :class:`CurvscopeError` naming the problem, files that are missing, not
    HDF5, foreign, of a newer schema, truncated, corrupted or laid out otherwise.
    """
    return parse(_read_bytes(path), str(path))


def read_results(path: Path) -> list[StoredCheckpoint]:
    """Every checkpoint group of the results file `path`, in label order."""
    return open_results(path).checkpoints


def stored_labels(path: Path) -> list[str]:
    """Labels of the checkpoints already in `path` (none when it does not exist)."""
    if not path.exists():
        return []
    return [ck.label for ck in read_results(path)]


#: Optional parts of a stored record, by the prefix of their datasets, with the analyse option that makes them.
OPTIONAL_PARTS = {"spectra": ("spectrum/", "--spectrum"), "order-3 results": ("order3/", "--order3"),
                  "K-FAC": ("interactions/kfac/", "--kfac auto or mc")}


def stored_parts(path: Path) -> dict[str, set[str]]:
    """For each label already in `path`, which of :data:`OPTIONAL_PARTS` its record holds."""
    if not path.exists():
        return {}
    return {ck.label: {part for part, (prefix, _) in OPTIONAL_PARTS.items() if any(k.startswith(prefix)
                                                                                   for k in ck.data)}
            for ck in read_results(path)}


def _probe_folder(path: Path) -> None:
    """Refuse `path` when its folder cannot be made or written, or when it is a folder itself."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".curvscope-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CurvscopeError(f"cannot write the results file {str(path)!r}: {exc.strerror or exc}.") from None
    if path.is_dir():
        raise CurvscopeError(f"cannot write the results file {str(path)!r}: it is a folder.")


def check_writable(path: Path) -> None:
    """Fail early, before any computation, when `path` cannot be written or is not a valid results file."""
    _probe_folder(path)
    if path.exists():
        open_results(path)  # refuses foreign, newer or damaged files before any work


def _write_record(root: h5py.Group, rec: AnalysisRecord) -> None:
    """The group /checkpoints/<label> of one record (DESIGN.md §3)."""
    grp = root.create_group(rec.label)
    for key, value in rec.attrs.items():
        grp.attrs[key] = value
    p, s = rec.pseudo, rec.step
    part = grp.create_group("partition")
    part.create_dataset("name", data=p.names.astype(object), dtype=STR)
    part.create_dataset("kind", data=p.kinds.astype(object), dtype=STR)
    part.create_dataset("layer", data=p.layers.astype(object), dtype=STR)
    part.create_dataset("size", data=p.sizes.astype(np.int64))
    grp.create_dataset("pseudo_gradient", data=p.pseudo_gradient.astype(np.float64))
    grp.create_dataset("pseudo_hessian", data=p.pseudo_hessian.astype(np.float64))
    grp.create_dataset("pseudo_hessian_stderr", data=p.pseudo_hessian_stderr.astype(np.float64))
    inv = grp.create_dataset("pseudo_hessian_inverse", data=s.inverse.astype(np.float64))
    inv.attrs.update({"method": s.method, "condition_number": s.condition_number,
                      "positive_definite": s.positive_definite, "rank": s.rank})
    inv.attrs.create("excluded", data=[str(n) for n in p.names[s.excluded]], dtype=STR)
    grp.create_dataset("pseudo_hessian_eigenvalues", data=s.eigenvalues.astype(np.float64))
    grp.create_dataset("learning_rates", data=s.learning_rates.astype(np.float64))
    grp.create_dataset("predicted_decrease", data=np.float64(s.predicted_decrease))
    _write_interactions(grp.create_group("interactions"), rec.interactions, p.loss - rec.loss_after)
    if rec.kfac is not None:
        _write_kfac(grp["interactions"].create_group("kfac"), rec.kfac)
    if rec.spectrum is not None:
        _write_spectrum(grp.create_group("spectrum"), rec.spectrum, p.pseudo_hessian)
    if rec.order3 is not None:
        _write_order3(grp.create_group("order3"), rec.order3)


def _write_order3(grp: h5py.Group, o3: Order3Result) -> None:
    grp.attrs.update({"singular_threshold": SINGULAR_THRESHOLD, "elapsed_s": o3.elapsed_s})
    grp.create_dataset("diagonal", data=o3.diagonal.astype(np.float64))
    grp.create_dataset("stderr", data=o3.stderr.astype(np.float64))
    cubic = grp.create_group("cubic")
    cubic.create_dataset("requested", data=o3.requested.astype(bool))
    cubic.create_dataset("found", data=np.array([st.found for st in o3.steps], dtype=bool))
    cubic.create_dataset("learning_rates", data=np.stack([st.learning_rates for st in o3.steps]).astype(np.float64))
    for key in ("damping_int", "r", "r0", "residual", "predicted_decrease"):
        cubic.create_dataset(key, data=np.array([getattr(st, key) for st in o3.steps], dtype=np.float64))
    cubic.create_dataset("actual_decrease", data=o3.actual_decrease.astype(np.float64))
    for key in ("start", "reason"):
        cubic.create_dataset(key, data=np.array([getattr(st, key) for st in o3.steps], dtype=object), dtype=STR)


def _write_interactions(grp: h5py.Group, inter: Interactions, actual: np.ndarray) -> None:
    grp.attrs.update({"positive_definite": inter.positive_definite,
                      "efficiency": "defined" if inter.positive_definite else "undefined: H̄ indefinite",
                      "significance_threshold": SIGNIFICANCE})
    grp.attrs.create("groupings", data=list(GROUPINGS), dtype=STR)
    grp.attrs.create("parts", data=list(PARTS), dtype=STR)
    for m in inter.matrices:
        mg = grp.create_group(m.matrix)
        for key in ("normalized", "off_block_ratio", "distance_mean", "distance_max"):
            mg.create_dataset(key, data=np.asarray(getattr(m, key), dtype=np.float64))
        mg.create_dataset("distance_count", data=m.distance_count.astype(np.int64))
    st = grp.create_group("steps")
    for key in ("name", "kind", "grouping"):
        st.create_dataset(key, data=np.asarray([getattr(s, key) for s in inter.steps], dtype=object), dtype=STR)
    st.create_dataset("learning_rates", data=np.stack([s.learning_rates for s in inter.steps]).astype(np.float64))
    st.create_dataset("predicted_decrease", data=np.array([s.predicted for s in inter.steps], dtype=np.float64))
    st.create_dataset("actual_decrease", data=np.asarray(actual, dtype=np.float64))
    st.create_dataset("efficiency", data=np.array([s.efficiency for s in inter.steps], dtype=np.float64))
    grp.create_dataset("significant", data=inter.significant.astype(bool))
    grp.create_dataset("significant_count", data=np.int64(inter.significant_count))


def _write_kfac(grp: h5py.Group, kf: KFACResult) -> None:
    m = kf.measures
    grp.attrs.update({"flavour": kf.flavour, "approximation": kf.approximation, "mc_samples": kf.mc_samples,
                      "seed": kf.seed, "elapsed_s": kf.elapsed_s})
    grp.attrs.create("exact", data=list(kf.exact), dtype=STR)
    grp.create_dataset("pseudo_curvature", data=kf.pseudo_curvature.astype(np.float64))
    grp.create_dataset("rule", data=kf.rules.astype(object), dtype=STR)
    grp.create_dataset("deviation_ratio", data=m.deviation.astype(np.float64))
    grp.create_dataset("learning_rates", data=m.step.learning_rates.astype(np.float64))
    for key, value in (("predicted_decrease", m.step.predicted), ("actual_decrease", kf.actual_decrease),
                       ("efficiency", m.step.efficiency)):
        grp.create_dataset(key, data=np.float64(value))
    layers = grp.create_group("layers")
    layers.create_dataset("name", data=m.layers.astype(object), dtype=STR)
    layers.create_dataset("rule", data=m.layer_rules.astype(object), dtype=STR)
    layers.create_dataset("error", data=m.layer_error.astype(np.float64))
    layers.create_dataset("efficiency", data=m.layer_efficiency.astype(np.float64))


def _write_eigen(grp: h5py.Group, e: EigenResult) -> None:
    grp.create_dataset("values", data=e.values.astype(np.float64))
    grp.create_dataset("residuals", data=e.residuals.astype(np.float64))
    grp.create_dataset("converged", data=e.converged.astype(bool))
    grp.attrs.update({"which": e.which, "dim": e.dim, "tol": e.tol, "steps": e.steps, "verified": e.verified,
                      "seed": e.seed})


def _write_trace(grp: h5py.Group, t: TraceResult) -> None:
    grp.create_dataset("trace", data=np.float64(t.value))
    grp.create_dataset("trace_stderr", data=np.float64(t.stderr))
    grp["trace"].attrs.update({"method": t.method, "matvecs": t.matvecs, "seed": t.seed})


def _write_spectrum(grp: h5py.Group, spec: SpectrumResult, pseudo_hessian: np.ndarray) -> None:
    grp.attrs.update({"hvp_mode": spec.mode, "graph_bytes": spec.graph_bytes, "products": spec.products,
                      "elapsed_s": spec.elapsed_s, "lanczos_basis": spec.lanczos_basis,
                      "vector_bytes": spec.vector_bytes})
    _write_eigen(grp.create_group("top"), spec.top)
    _write_eigen(grp.create_group("bottom"), spec.bottom)
    _write_trace(grp, spec.trace)
    d = spec.density
    dens = grp.create_group("density")
    for key in ("grid", "density", "nodes", "weights"):
        dens.create_dataset(key, data=np.asarray(getattr(d, key), dtype=np.float64))
    dens.attrs.update({"sigma": d.sigma, "runs": d.runs, "steps": d.steps, "seed": d.seed})
    grp.create_dataset("normalized_pseudo_hessian_eigenvalues",
                       data=np.linalg.eigvalsh(np.nan_to_num(normalized(pseudo_hessian))))
    blocks = grp.create_group("blocks")
    blocks.attrs.create("order", data=[b.group for b in spec.blocks], dtype=STR)
    for b in spec.blocks:
        bg = blocks.create_group(b.group)
        bg.attrs.update({"kind": b.kind, "dim": b.trace.dim})
        bg.create_dataset("names", data=b.names.astype(object), dtype=STR)
        if b.top is not None:  # None: eigenvalues not asked for (--block-spectra)
            _write_eigen(bg.create_group("top"), b.top)
        _write_trace(bg, b.trace)


def check_label(label: str) -> None:
    """Refuse a checkpoint label that cannot name a group of the results file (see NAME_PATTERN)."""
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        raise CurvscopeError(f"the checkpoint label {label!r} is not valid text: rename the checkpoint file.") from None
    if not re.fullmatch(NAME_PATTERN, label):
        raise CurvscopeError(f"the checkpoint label {label!r} cannot name a group of the results file (it must be "
                             f"printable, without '/', and not '.'): rename the checkpoint file.")


def _with_records(old: bytes | None, records: Sequence[AnalysisRecord]) -> bytes:
    """The bytes of a new results file: the checkpoints of `old` (None: none) that `records` do not
    replace, copied as they are, and `records`. Built afresh, so rewriting never grows the file."""
    bio = io.BytesIO()
    with h5py.File(bio, "w") as fh:
        fh.attrs["format"] = FORMAT
        fh.attrs["schema_version"] = SCHEMA_VERSION
        fh.attrs["curvscope_version"] = __version__
        root = fh.create_group("checkpoints")
        if old:
            _copy_checkpoints(old, root, {rec.label for rec in records})
        for rec in records:
            _write_record(root, rec)
    return bio.getvalue()


def _copy_checkpoints(old: bytes, root: h5py.Group, skip: set[str]) -> None:
    """Copy every checkpoint group of the results file `old` into `root`, except those labelled in `skip`."""
    with h5py.File(io.BytesIO(old), "r") as src:
        for label in src.get("checkpoints", {}):
            if label not in skip:
                src.copy(src["checkpoints"][label], root, name=label)


def write_records(path: Path, records: Sequence[AnalysisRecord],
                  on_wait: Callable[[str], None] | None = None) -> None:
    """Add (or replace) `records` in the results file `path`, atomically.

    Holds the file's lock from reading the old file to renaming the new one into place;
    when another process holds it, `on_wait` (if given) is called once with a message and
    this one waits. A full disk or an I/O error raises :class:`CurvscopeError` and leaves
    the old file exactly as it was, with no temporary file behind.
    """
    records = list({rec.label: rec for rec in records}.values())  # one per label, the last given
    for rec in records:
        check_label(rec.label)
    _probe_folder(path)
    try:
        with exclusive_lock(path, on_wait):
            old = _read_bytes(path) if path.exists() else None
            if old is not None:
                parse(old, str(path))  # refuses foreign, newer or damaged files, read under the lock
            new = _with_records(old, records)
            _check_written(new, path)
            replace_file(path, new)
    except OSError as exc:
        raise _cannot_write(path, exc) from None


def _check_written(data: bytes, path: Path) -> None:
    """Refuse to replace `path` with a file the reader would reject (records made wrongly through the API,
    e.g. an attribute of the wrong type; never bad input from a user)."""
    try:
        parse(data, str(path))
    except CurvscopeError as exc:
        raise ValueError(f"the records do not follow the results schema, so {str(path)!r} was left as it was: "
                         f"{exc}") from None


def describe(path: Path) -> str:
    """A human-readable account of what the results file `path` holds."""
    results = open_results(path)
    head = (f"{path}: curvscope results, schema version {results.schema_version} "
            f"(written by curvscope {results.curvscope_version})")
    lines = [head]
    if not results.checkpoints:
        lines.append("  no checkpoints")
    for ck in results.checkpoints:
        lines += _describe_checkpoint(ck)
    return "\n".join(lines)


def _describe_checkpoint(ck: StoredCheckpoint) -> list[str]:
    """The lines of `describe` for one checkpoint."""
    a = ck.attrs
    threads = f" ({a['threads']} thread{'s' if a['threads'] != 1 else ''})" if "threads" in a else ""
    batches = "in one batch" if a.get("n_batches") == 1 else f"in batches of {a.get('batch_size')}"
    lines = [(f"\n[{ck.label}] {a.get('model')} on {a.get('dataset')} ({a.get('split')}), epoch {a.get('epoch')}, "
              f"N={a.get('n_samples')} {batches}, "
              f"loss {a.get('loss')} = {a.get('loss_value', float('nan')):.6g}"),
             f"  source {a.get('source')} (sha256 {str(a.get('sha256'))[:12]}…)",
             (f"  {a.get('curvature')} curvature, {a.get('partition')} partition, {a.get('dtype')} on "
              f"{a.get('device')}{threads}, "
              f"{a.get('elapsed_s', 0):.2f} s, created {a.get('created')}"),
             _pseudo_hessian_line(ck)]
    excluded = ck.data_attrs["pseudo_hessian_inverse"]["excluded"]
    if len(excluded):
        lines.append("  zero gradient, excluded from the inverse: " + ", ".join(excluded))
    if a.get("collinear"):
        lines.append(f"  {stored_kind(ck.attrs).bar} is singular; collinear groups: {a['collinear']}")
    lines += _kfac_lines(ck)
    lines += _order3_lines(ck)
    if a.get("frozen"):
        lines.append(f"  frozen (requires_grad False), left out: {a['frozen']}")
    if a.get("batchnorm"):
        stats = "the running ones (eval)" if a["batchnorm"] == "eval" else "each batch's own (batch)"
        lines.append(f"  BatchNorm statistics: {stats}")
    lines += [f"  {note}" for note in model_notes(a)]
    lines += [f"  warning: {w}" for w in record_warnings(a)]
    bar_ss = stored_kind(ck.attrs).bar + "_ss"
    lines.append(f"  {'group':24s} {'kind':6s} {'size':>9s} {'ḡ_s':>11s} {bar_ss:>11s} {'η*_s':>11s}")
    for i, name in enumerate(ck["partition/name"]):
        lines.append(f"  {name:24s} {ck['partition/kind'][i]:6s} {int(ck['partition/size'][i]):9d} "
                     f"{ck['pseudo_gradient'][i]:11.4g} {ck['pseudo_hessian'][i, i]:11.4g} "
                     f"{ck['learning_rates'][i]:11.4g}")
    if "spectrum/top/values" in ck.data:
        lines += _spectrum_lines(ck)
    lines.append("  datasets:")
    for name in sorted(ck.data):
        arr = np.asarray(ck.data[name])
        lines.append(f"    {name:32s} {arr.shape!s:12s} {arr.dtype}")
    return lines


def model_notes(attrs: Mapping[str, object]) -> list[str]:
    """What a record's attributes say of the model as analysed: tied tensors, the output used, BatchNorm's mode."""
    notes = []
    if attrs.get("tied"):
        notes.append(f"tied (one tensor under several names, analysed once): {attrs['tied']}")
    if attrs.get("outputs"):
        notes.append(f"predictions: {attrs['outputs']}")
    if attrs.get("batchnorm_note"):
        notes.append(f"note: {attrs['batchnorm_note']}")
    return notes


def record_warnings(attrs: Mapping[str, object]) -> list[str]:
    """The warnings a record's attributes carry (a non-deterministic model, BatchNorm statistics far apart)."""
    return [str(attrs[key]) for key in ("determinism_warning", "batchnorm_warning") if attrs.get(key)]


def _pseudo_hessian_line(ck: StoredCheckpoint) -> str:
    """S, the inverse's method and condition number, whether C̄ (H̄, Ḡ or F̄) is positive definite (as stored,
    unless C̄ holds NaN or inf, which makes any such claim meaningless) and the predicted decrease."""
    inv, bar = ck.data_attrs["pseudo_hessian_inverse"], stored_kind(ck.attrs).bar
    definite = (f"positive definite: {inv['positive_definite']}" if np.all(np.isfinite(ck["pseudo_hessian"]))
                else f"{bar} has non-finite entries")
    return (f"  {bar}: S={len(ck['pseudo_gradient'])}, {inv['method']}, "
            f"condition number {inv['condition_number']:.3g}, {definite}, "
            f"predicted decrease {ck['predicted_decrease']:.4g}")


def _kfac_lines(ck: StoredCheckpoint) -> list[str]:
    """K-FAC's step beside the exact layer blocks' (interactions/kfac), or why it is absent."""
    if "interactions/kfac/efficiency" not in ck.data:
        return [f"  {ck.attrs['kfac_note']}"] if ck.attrs.get("kfac_note") else []
    k, bar = ck.data_attrs["interactions/kfac"], stored_kind(ck.attrs).bar
    steps = ck["interactions/steps/kind"], ck["interactions/steps/grouping"]
    layer = float(ck["interactions/steps/efficiency"][(steps[0] == "hessian") & (steps[1] == "layer")][0])
    exact = f"; kept exact: {', '.join(k['exact'])}" if len(k["exact"]) else ""
    return [f"  K-FAC ({k['flavour']}, {k['approximation']}): step efficiency {ck['interactions/kfac/efficiency']:.4g} "
            f"(exact layer blocks of {bar}: {layer:.4g}), deviation from {bar} "
            f"{ck['interactions/kfac/deviation_ratio'][0]:.3g}, predicted decrease "
            f"{ck['interactions/kfac/predicted_decrease']:.4g}, actual {ck['interactions/kfac/actual_decrease']:.4g}"
            f"{exact}"]


def _order3_lines(ck: StoredCheckpoint) -> list[str]:
    """The order-3 diagonal and the cubic-regularised steps asked for (order3/), when stored."""
    if "order3/diagonal" not in ck.data:
        return []
    d = ck["order3/diagonal"]
    lines = [f"  order-3 diagonal D: |D_s| from {np.abs(d).min():.3g} to {np.abs(d).max():.3g}"]
    asked = ck["order3/cubic/requested"]
    for i in np.flatnonzero(asked):
        c = {key: ck[f"order3/cubic/{key}"][i] for key in ("damping_int", "found", "predicted_decrease",
                                                              "actual_decrease", "r", "reason")}
        head = f"  cubic step (λ_int={c['damping_int']:g}): "
        lines.append(head + (f"predicted decrease {c['predicted_decrease']:.4g}, actual {c['actual_decrease']:.4g}, "
                             f"r = ‖Dη‖ = {c['r']:.4g}" if c["found"] else f"none found: {c['reason']}"))
    return lines


def _spectrum_lines(ck: StoredCheckpoint) -> list[str]:
    """The extreme eigenvalues and the trace of C, as `describe` shows them."""
    lines, short = [], stored_kind(ck.attrs).short
    for end in ("top", "bottom"):
        vals, conv = ck[f"spectrum/{end}/values"], ck[f"spectrum/{end}/converged"]
        lines.append(f"  {short} {end}-{len(vals)}: " + ", ".join(
            f"{v:.5g}{'' if c else ' (not converged)'}" for v, c in zip(vals, conv)))
    sa = ck.data_attrs["spectrum"]
    lines.append(f"  {short} trace {ck['spectrum/trace']:.5g} ± {ck['spectrum/trace_stderr']:.2g}; "
                 f"{sa['products']} {short}-vector products ({sa['hvp_mode']}), {sa['elapsed_s']:.1f} s")
    return lines + _block_lines(ck)


def _block_lines(ck: StoredCheckpoint) -> list[str]:
    """Each diagonal block's trace and, where stored (all blocks in older files), its largest eigenvalue."""
    order = [str(g) for g in np.atleast_1d(ck.data_attrs.get("spectrum/blocks", {}).get("order", []))]
    if not order:
        return []
    b = "spectrum/blocks/"
    methods = sorted({str(ck.data_attrs[f"{b}{g}/trace"]["method"]) for g in order})
    with_top = [g for g in order if f"{b}{g}/top/values" in ck.data]
    lines = [f"  diagonal blocks: traces of {len(order)} ({'; '.join(methods)}), top eigenvalues of {len(with_top)}",
             f"  {'block':24s} {'kind':6s} {'dim':>9s} {'trace':>11s} {'± s.e.':>9s} {'λ_max':>11s}"]
    for g in order:
        top = "—"
        if g in with_top:
            top = f"{ck[b + g + '/top/values'][0]:.4g}" + ("" if ck[b + g + "/top/converged"][0] else "*")
        lines.append(f"  {g:24s} {ck.data_attrs[b + g]['kind']:6s} {int(ck.data_attrs[b + g]['dim']):9d} "
                     f"{float(ck[b + g + '/trace']):11.4g} {float(ck[b + g + '/trace_stderr']):9.2g} {top:>11s}")
    if any(not ck[b + g + "/top/converged"][0] for g in with_top):
        lines.append("  * not converged")
    return lines
