"""The HDF5 results file, schema version 1 (DESIGN.md §3), written atomically.

Writes go to a temporary file beside the target (a copy of it when it exists)
which replaces the target only once complete, so a failed or interrupted run
leaves an earlier results file exactly as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from curvscope import __version__
from curvscope.analysis import AnalysisRecord
from curvscope.errors import CurvscopeError
from curvscope.measures.interactions import GROUPINGS, PARTS, SIGNIFICANCE, Interactions
from curvscope.measures.normalized import normalized
from curvscope.results import EigenResult, SpectrumResult, TraceResult

FORMAT = "curvscope"
SCHEMA_VERSION = 1
STR = h5py.string_dtype()


@dataclass(frozen=True)
class StoredCheckpoint:
    """One /checkpoints/<label> group read back: attributes and every dataset as numpy."""

    label: str
    attrs: dict
    data: dict  # dataset path inside the group -> np.ndarray (strings decoded)
    data_attrs: dict  # dataset or subgroup path -> attrs dict

    def __getitem__(self, key: str) -> np.ndarray:
        return self.data[key]


def check_writable(path: Path) -> None:
    """Fail early, before any computation, when `path` cannot be written."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".curvscope-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CurvscopeError(f"cannot write the results file {str(path)!r}: {exc.strerror or exc}.") from None
    if path.exists():
        if path.is_dir():
            raise CurvscopeError(f"cannot write the results file {str(path)!r}: it is a folder.")
        open_results(path).close()  # refuses foreign or newer files before any work


def open_results(path: Path, mode: str = "r") -> h5py.File:
    """Open an existing curvscope results file, refusing foreign files and newer schemas."""
    if not path.exists():
        raise CurvscopeError(f"results file {str(path)!r} does not exist.")
    if not h5py.is_hdf5(path):
        raise CurvscopeError(f"{str(path)!r} is not an HDF5 file (is it a checkpoint rather than results?).")
    fh = h5py.File(path, mode)
    if fh.attrs.get("format") != FORMAT:
        fh.close()
        raise CurvscopeError(f"{str(path)!r} is an HDF5 file but not a curvscope results file.")
    version = int(fh.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        fh.close()
        raise CurvscopeError(f"{str(path)!r} uses results schema version {version}, newer than the "
                             f"version {SCHEMA_VERSION} this curvscope ({__version__}) reads: upgrade curvscope.")
    return fh


def stored_labels(path: Path) -> list[str]:
    """Labels of the checkpoints already in `path` (none when it does not exist)."""
    if not path.exists():
        return []
    with open_results(path) as fh:
        return sorted(fh.get("checkpoints", {}).keys())


def _write_record(root: h5py.Group, rec: AnalysisRecord) -> None:
    if rec.label in root:
        del root[rec.label]
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
    if rec.spectrum is not None:
        _write_spectrum(grp.create_group("spectrum"), rec.spectrum, p.pseudo_hessian)


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
                      "elapsed_s": spec.elapsed_s})
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
        bg.attrs.update({"kind": b.kind, "dim": b.top.dim})
        bg.create_dataset("names", data=b.names.astype(object), dtype=STR)
        _write_eigen(bg.create_group("top"), b.top)
        _write_trace(bg, b.trace)


def write_records(path: Path, records: Sequence[AnalysisRecord]) -> None:
    """Add (or replace) `records` in the results file `path`, atomically."""
    check_writable(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if path.exists() else "w") as fh:
            fh.attrs["format"] = FORMAT
            fh.attrs["schema_version"] = SCHEMA_VERSION
            fh.attrs["curvscope_version"] = __version__
            root = fh.require_group("checkpoints")
            for rec in records:
                _write_record(root, rec)
        with tmp.open("rb") as fh_sync:
            os.fsync(fh_sync.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CurvscopeError(f"cannot write the results file {str(path)!r}: {exc.strerror or exc}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def _walk(group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, h5py.Group | h5py.Dataset]]:
    """Every dataset and subgroup below `group`, by path, parents first."""
    for key, item in group.items():
        name = f"{prefix}{key}"
        yield name, item
        if isinstance(item, h5py.Group):
            yield from _walk(item, name + "/")


def _decode(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in value.ravel()],
                          dtype=str).reshape(value.shape)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_results(path: Path) -> list[StoredCheckpoint]:
    """Every checkpoint group of the results file `path`, in label order."""
    out = []
    with open_results(path) as fh:
        for label in sorted(fh.get("checkpoints", {}).keys()):
            grp = fh["checkpoints"][label]
            items = list(_walk(grp))
            data = {name: _decode(ds[()]) for name, ds in items if isinstance(ds, h5py.Dataset)}
            data_attrs = {name: {k: _decode(v) for k, v in ds.attrs.items()} for name, ds in items}
            out.append(StoredCheckpoint(label, {k: _decode(v) for k, v in grp.attrs.items()}, data, data_attrs))
    return out


def describe(path: Path) -> str:
    """A human-readable account of what the results file `path` holds."""
    with open_results(path) as fh:
        head = (f"{path}: curvscope results, schema version {int(fh.attrs['schema_version'])} "
                f"(written by curvscope {fh.attrs.get('curvscope_version', '?')})")
    lines = [head]
    checkpoints = read_results(path)
    if not checkpoints:
        lines.append("  no checkpoints")
    for ck in checkpoints:
        a = ck.attrs
        lines.append(f"\n[{ck.label}] {a.get('model')} on {a.get('dataset')} ({a.get('split')}), "
                     f"epoch {a.get('epoch')}, N={a.get('n_samples')} in batches of {a.get('batch_size')}, "
                     f"loss {a.get('loss')} = {a.get('loss_value', float('nan')):.6g}")
        lines.append(f"  source {a.get('source')} (sha256 {str(a.get('sha256'))[:12]}…)")
        lines.append(f"  {a.get('curvature')} curvature, {a.get('partition')} partition, "
                     f"{a.get('dtype')} on {a.get('device')}, {a.get('elapsed_s', 0):.2f} s, created {a.get('created')}")
        inv = ck.data_attrs.get("pseudo_hessian_inverse", {})
        lines.append(f"  H̄: S={len(ck['pseudo_gradient'])}, {inv.get('method')}, condition number "
                     f"{inv.get('condition_number', float('nan')):.3g}, positive definite: "
                     f"{inv.get('positive_definite')}, predicted decrease {float(ck['predicted_decrease']):.4g}")
        if len(np.atleast_1d(inv.get("excluded", []))):
            lines.append("  zero gradient, excluded from the inverse: " + ", ".join(np.atleast_1d(inv["excluded"])))
        if a.get("frozen"):
            lines.append(f"  frozen (requires_grad False), left out: {a['frozen']}")
        if a.get("determinism_warning"):
            lines.append(f"  warning: {a['determinism_warning']}")
        lines.append(f"  {'group':24s} {'kind':6s} {'size':>9s} {'ḡ_s':>11s} {'H̄_ss':>11s} {'η*_s':>11s}")
        for i, name in enumerate(ck["partition/name"]):
            lines.append(f"  {name:24s} {ck['partition/kind'][i]:6s} {int(ck['partition/size'][i]):9d} "
                         f"{ck['pseudo_gradient'][i]:11.4g} {ck['pseudo_hessian'][i, i]:11.4g} "
                         f"{ck['learning_rates'][i]:11.4g}")
        if "spectrum/top/values" in ck.data:
            sa = ck.data_attrs.get("spectrum", {})
            for end in ("top", "bottom"):
                vals, conv = ck[f"spectrum/{end}/values"], ck[f"spectrum/{end}/converged"]
                lines.append(f"  Hessian {end}-{len(vals)}: " + ", ".join(
                    f"{v:.5g}{'' if c else ' (not converged)'}" for v, c in zip(vals, conv)))
            lines.append(f"  Hessian trace {float(ck['spectrum/trace']):.5g} ± {float(ck['spectrum/trace_stderr']):.2g}; "
                         f"{sa.get('products')} Hessian-vector products ({sa.get('hvp_mode')}), "
                         f"{sa.get('elapsed_s', 0):.1f} s")
        lines.append("  datasets:")
        for name in sorted(ck.data):
            arr = np.asarray(ck.data[name])
            lines.append(f"    {name:32s} {str(arr.shape):12s} {arr.dtype}")
    return "\n".join(lines)
