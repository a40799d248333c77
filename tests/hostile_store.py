"""Damaged and tampered results files for the corpus of ``test_hostile.py`` (issue #13).

A real results file is made first (the tiny bundle analysed with spectra, by the CLI in-process);
the corpus is then drawn from it: truncations and bit flips from fixed seeds, and one tampered
copy per kind of schema violation (wrong shapes, dtypes, kinds of member, attributes, links,
data kept outside the file …). K-FAC's interactions/kfac group (issue #15) is tampered in a second
base file, the tiny bundle's GGN without spectra (the first base file, whose bytes decide where
the seeded bit flips land, is left as it was). Every variant is run through ``info``, ``render``, ``audit`` and
``analyse -o VARIANT``; each must refuse it in one paragraph with exit 2 and leave it as it was.
Bit flips that land in unused bytes or in the numbers leave a file that still reads: those are
expected to succeed (``audit``: 0 or 1, its verdict), still without a traceback or a change.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner
from conftest import write_tiny_bundle
from hostile import HostileCase, flipped

from curvscope.cli.main import main
from curvscope.errors import CurvscopeError
from curvscope.store.reader import looks_like_hdf5, parse

LABEL = "tiny_ep03"
KFAC_LABEL = f"{LABEL}@ggn"  # the record of the second base file, which holds interactions/kfac
#: Every refusal of a damaged results file says which file and that it is not usable results.
REFUSED = r"(not a valid curvscope results file|cannot be read as a curvscope results file|not an HDF5 file)"
Tamper = Callable[[h5py.File, h5py.Group], None]


def words(text: str) -> str:
    """A regular expression for `text` in the flattened (unwrapped) message."""
    return r"\s*".join(re.escape(w) for w in text.split())


def results_file(tmp: Path) -> tuple[Path, Path]:
    """The tiny bundle and a real results file of it (with spectra), made by the CLI."""
    ckpt = write_tiny_bundle(tmp / f"{LABEL}.pt")
    out = tmp / "base.h5"
    res = CliRunner().invoke(main, ["analyse", str(ckpt), "-o", str(out), "--no-render", "-q"])
    assert res.exit_code == 0, res.output
    return ckpt, out


def ggn_results_file(tmp: Path, ckpt: Path) -> Path:
    """A second real results file: the GGN of `ckpt` without spectra, with K-FAC (interactions/kfac)."""
    out = tmp / "base-ggn.h5"
    res = CliRunner().invoke(main, ["analyse", str(ckpt), "-o", str(out), "--curvature", "ggn", "--no-spectrum",
                                    "--no-render", "-q"])
    assert res.exit_code == 0, res.output
    with h5py.File(out) as fh:
        assert "interactions/kfac/efficiency" in fh[f"checkpoints/{KFAC_LABEL}"], "no K-FAC to tamper with"
    return out


def _replace(group: h5py.Group, name: str, data: object = None, **kwargs: object) -> None:
    """Put a new dataset `name` (or, with kwargs only, an empty one) where the old member was."""
    del group[name]
    group.create_dataset(name, data=data, **kwargs)


def _S(ck: h5py.Group) -> int:
    return ck["pseudo_gradient"].shape[0]


def _garbage_inside(fh: h5py.File, ck: h5py.Group) -> None:
    """The format attribute right, everything below it random."""
    del fh["checkpoints"]
    rng = np.random.default_rng(7)
    grp = fh.create_group("checkpoints/junk")
    for i in range(5):
        grp.create_dataset(f"d{i}", data=rng.integers(0, 255, size=int(rng.integers(1, 50)), dtype=np.uint8))


def _external_storage(side: Path) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        side.write_bytes(b"\0" * 8 * _S(ck))
        _replace(ck, "pseudo_gradient", shape=(_S(ck),), dtype="f8", external=[(str(side), 0, 8 * _S(ck))])
    return tamper


def _external_link(target: Path) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        del ck["pseudo_hessian"]
        ck["pseudo_hessian"] = h5py.ExternalLink(str(target), f"/checkpoints/{LABEL}/pseudo_hessian")
    return tamper


def _soft_link(fh: h5py.File, ck: h5py.Group) -> None:
    del ck["learning_rates"]
    ck["learning_rates"] = h5py.SoftLink(f"/checkpoints/{LABEL}/pseudo_gradient")


def _all_empty(fh: h5py.File, ck: h5py.Group) -> None:
    """S = 0 everywhere: consistent shapes, nothing to analyse."""
    attrs = dict(ck.attrs)
    del fh[f"checkpoints/{LABEL}"]
    ck = fh.create_group(f"checkpoints/{LABEL}")
    ck.attrs.update(attrs)
    for key, value in {"pseudo_gradient": np.zeros(0), "pseudo_hessian": np.zeros((0, 0))}.items():
        ck.create_dataset(key, data=value)


def _steps_without_newton(fh: h5py.File, ck: h5py.Group) -> None:
    kinds = [k.decode() for k in ck["interactions/steps/kind"][()]]
    _replace(ck["interactions/steps"], "kind", np.array(["cauchy" if k == "newton" else k for k in kinds],
                                                        dtype=object), dtype=h5py.string_dtype())


def _set_attr(path: str, name: str, value: object) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        obj = fh if path == "/" else ck[path] if path else ck
        obj.attrs[name] = value
    return tamper


def _del_attr(path: str, name: str) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        del (fh if path == "/" else ck[path] if path else ck).attrs[name]
    return tamper


def _reshape(path: str, shape: Callable[[int], tuple[int, ...]], dtype: str = "f8") -> Tamper:
    """Replace the dataset `path` of the checkpoint by zeros of shape(S)."""
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        parent, name = path.rpartition("/")[::2]
        _replace(ck[parent] if parent else ck, name, np.zeros(shape(_S(ck)), dtype=dtype))
    return tamper


def _retype(path: str, data: Callable[[int], np.ndarray], **kwargs: object) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        parent, name = path.rpartition("/")[::2]
        _replace(ck[parent] if parent else ck, name, data(_S(ck)), **kwargs)
    return tamper


def _as_group(path: str) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        root = fh if path.startswith("/") else ck
        del root[path.lstrip("/")]
        root.create_group(path.lstrip("/"))
    return tamper


def _as_dataset(path: str) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        root = fh if path.startswith("/") else ck
        del root[path.lstrip("/")]
        root.create_dataset(path.lstrip("/"), data=np.arange(3.0))
    return tamper


def _delete(path: str) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        del ck[path]
    return tamper


def _rename_label(new: str) -> Tamper:
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        fh["checkpoints"].move(LABEL, new)
    return tamper


def tampered(tmp: Path) -> dict[str, tuple[Tamper, str]]:
    """Each schema violation, and (a regular expression of) what the refusal must name."""
    string = {"dtype": h5py.string_dtype()}
    return {
        "schema_version a string": (_set_attr("/", "schema_version", "1"), words("schema_version is a string")),
        "schema_version a float": (_set_attr("/", "schema_version", 1.0), words("schema_version is a float")),
        "schema_version an array": (_set_attr("/", "schema_version", np.array([1, 1])),
                                    words("schema_version has shape (2,), expected ()")),
        "schema_version missing": (_del_attr("/", "schema_version"), words("schema_version is missing")),
        "schema_version negative": (_set_attr("/", "schema_version", -1), words("schema_version is -1")),
        "format attribute foreign": (_set_attr("/", "format", "netcdf"), "not a curvscope results file"),
        "garbage below the format attribute": (_garbage_inside,
                                               words("checkpoint 'junk': dataset pseudo_gradient is missing")),
        "H̄ not square": (_reshape("pseudo_hessian", lambda S: (S, S + 1)),
                         r"pseudo_hessian has shape \(4, 5\), expected \(S, S\) = \(4, 4\)"),
        "H̄ of integers": (_reshape("pseudo_hessian", lambda S: (S, S), "i8"),
                          words("pseudo_hessian is an integer (int64), expected a float")),
        "H̄ of complex numbers": (_reshape("pseudo_hessian", lambda S: (S, S), "c16"),
                                 words("pseudo_hessian is of unsupported type complex128")),
        "ḡ too long": (_reshape("pseudo_gradient", lambda S: (S + 1,)), words("partition/name has shape (4,)")),
        "ḡ a matrix": (_reshape("pseudo_gradient", lambda S: (S, 1)), words("pseudo_gradient has shape (4, 1)")),
        "stderr of strings": (_retype("pseudo_hessian_stderr", lambda S: np.array(["x"] * S * S, dtype=object)
                                      .reshape(S, S), **string),
                              words("pseudo_hessian_stderr is a string")),
        "inverse a vector": (_reshape("pseudo_hessian_inverse", lambda S: (S,)),
                             words("pseudo_hessian_inverse has shape (4,), expected (S, S)")),
        "eigenvalues too short": (_reshape("pseudo_hessian_eigenvalues", lambda S: (S - 1,)),
                                  words("pseudo_hessian_eigenvalues has shape (3,)")),
        "learning rates a matrix": (_reshape("learning_rates", lambda S: (S, S)), words("learning_rates has shape")),
        "predicted decrease a vector": (_reshape("predicted_decrease", lambda S: (2,)),
                                        words("predicted_decrease has shape (2,), expected ()")),
        "partition of another S": (_reshape("partition/size", lambda S: (S + 2,), "i8"),
                                   words("partition/size has shape (6,), expected (S,) = (4,)")),
        "partition names of floats": (_reshape("partition/name", lambda S: (S,)), words("partition/name is a float")),
        "partition kind unknown": (_retype("partition/kind", lambda S: np.array(["banana"] * S, dtype=object),
                                           **string), words("partition/kind holds 'banana'")),
        "partition names not UTF-8": (_retype("partition/name", lambda S: np.array([b"\xff\xfe"] * S, dtype="S2")),
                                      words("partition/name holds bytes that are not UTF")),
        "off-block ratio (2, 3)": (_reshape("interactions/hessian/off_block_ratio", lambda S: (2, 3)),
                                   words("interactions/hessian/off_block_ratio has shape (2, 3), expected (2, 4)")),
        "normalized of another S": (_reshape("interactions/inverse/normalized", lambda S: (S + 1, S + 1)),
                                    words("interactions/inverse/normalized has shape (5, 5)")),
        "distance counts of another K": (_reshape("interactions/hessian/distance_count", lambda S: (7,), "i8"),
                                         words("interactions/hessian/distance_count has shape (7,), expected (K,)")),
        "steps of another n": (_reshape("interactions/steps/learning_rates", lambda S: (5, S)),
                               words("interactions/steps/learning_rates has shape (5, 4), expected (n, S) = (6, 4)")),
        "interactions without steps": (_delete("interactions/steps"), words("group interactions/steps is missing")),
        "significant count a vector": (_reshape("interactions/significant_count", lambda S: (2,), "i8"),
                                       words("interactions/significant_count has shape (2,), expected ()")),
        "steps without Newton's": (_steps_without_newton, words("lack the step(s) newton")),
        "step names of integers": (_reshape("interactions/steps/name", lambda S: (6,), "i8"),
                                   words("interactions/steps/name is an integer")),
        "significant of floats": (_reshape("interactions/significant", lambda S: (S, S)),
                                  words("interactions/significant is a float")),
        "interactions a dataset": (_as_dataset("interactions"), words("interactions is a dataset, expected a group")),
        "checkpoints a dataset": (_as_dataset("/checkpoints"), words("checkpoints is a dataset, expected a group")),
        "checkpoint a dataset": (_as_dataset(f"/checkpoints/{LABEL}"), words("is a dataset, expected a group")),
        "H̄ a group": (_as_group("pseudo_hessian"), words("pseudo_hessian is a group, expected a dataset")),
        "positive_definite a string": (_set_attr("pseudo_hessian_inverse", "positive_definite", "yes"),
                                       words("attribute positive_definite of pseudo_hessian_inverse is a string")),
        "interactions flag missing": (_del_attr("interactions", "positive_definite"),
                                      words("attribute positive_definite of interactions is missing")),
        "inverse method unknown": (_set_attr("pseudo_hessian_inverse", "method", "magic"),
                                   words("holds 'magic', expected one of 'inverse'")),
        "epoch a string": (_set_attr("", "epoch", "three"), words("attribute epoch is a string")),
        "model an integer": (_set_attr("", "model", 7),
                             words("attribute model is an integer (int64), expected a string")),
        "label with a line break": (_rename_label("two\nlines"), words("not a printable name")),
        "top eigenvalues of another k": (_reshape("spectrum/top/residuals", lambda S: (9,)),
                                         words("spectrum/top/residuals has shape (9,), expected (k,) = (5,)")),
        "density nodes and weights differ": (_reshape("spectrum/density/weights", lambda S: (2, 3)),
                                             words("spectrum/density/weights has shape (2, 3)")),
        "spectrum without its trace": (_delete("spectrum/trace"), words("dataset spectrum/trace is missing")),
        "spectrum empty": (_as_group("spectrum"), words("attribute hvp_mode of spectrum is missing")),
        "block order names a lost block": (_delete("spectrum/blocks/net.1"),
                                           words("does not name each of the block groups")),
        "normalized eigenvalues of another S": (_reshape("spectrum/normalized_pseudo_hessian_eigenvalues",
                                                         lambda S: (S + 3,)),
                                                words("normalized_pseudo_hessian_eigenvalues has shape (7,)")),
        "density of a billion points": (_reshape_huge("spectrum/density/grid"),
                                        words("more than a file of this size can hold")),
        "no checkpoint datasets at all": (_all_empty, words("expected S >= 1")),
        "H̄ in another file": (_external_link(tmp / "elsewhere.h5"), words("results files hold no links")),
        "learning rates a soft link": (_soft_link, words("results files hold no links")),
        "ḡ stored outside the file": (_external_storage(tmp / "side.bin"),
                                      words("keeps its data outside the file")),
        "ḡ of compound records": (_retype("pseudo_gradient", lambda S: np.zeros(S, dtype=[("a", "f8"), ("b", "i4")])),
                                  words("pseudo_gradient is of unsupported type")),
    }


def kfac_tampered() -> dict[str, tuple[Tamper, str]]:
    """Each schema violation of interactions/kfac (applied to the GGN base file), and what the refusal must name."""
    kf = "interactions/kfac"
    string = {"dtype": h5py.string_dtype()}
    return {
        "K̄ not square": (_reshape(f"{kf}/pseudo_curvature", lambda S: (S, S + 1)),
                         words(f"{kf}/pseudo_curvature has shape (4, 5), expected (S, S) = (4, 4)")),
        "K-FAC rule unknown": (_retype(f"{kf}/rule", lambda S: np.array(["quadratic"] * S, dtype=object), **string),
                               words(f"dataset {kf}/rule holds 'quadratic', expected one of 'linear'")),
        "K-FAC flavour unknown": (_set_attr(kf, "flavour", "type-3"),
                                  words(f"attribute flavour of {kf} holds 'type-3', expected one of 'type-2'")),
        "K-FAC approximation unknown": (_set_attr(kf, "approximation", "squeeze"),
                                        words(f"attribute approximation of {kf} holds 'squeeze'")),
        "K-FAC layer errors of another L": (_reshape(f"{kf}/layers/error", lambda S: (3,)),
                                            words(f"{kf}/layers/error has shape (3,), expected (L,) = (2,)")),
        "K-FAC efficiency a vector": (_reshape(f"{kf}/efficiency", lambda S: (2,)),
                                      words(f"{kf}/efficiency has shape (2,), expected ()")),
        "K-FAC mc_samples a string": (_set_attr(kf, "mc_samples", "three"),
                                      words(f"attribute mc_samples of {kf} is a string")),
        "K-FAC a dataset": (_as_dataset(kf), words(f"{kf} is a dataset, expected a group")),
        "K-FAC deviation ratios too short": (_reshape(f"{kf}/deviation_ratio", lambda S: (3,)),
                                             words(f"{kf}/deviation_ratio has shape (3,), expected (4,)")),
    }


def _reshape_huge(path: str) -> Tamper:
    """A dataset declaring 10⁹ elements that were never written (HDF5 would return its fill value)."""
    def tamper(fh: h5py.File, ck: h5py.Group) -> None:
        parent, name = path.rpartition("/")[::2]
        _replace(ck[parent], name, shape=(10**9,), dtype="f8")
    return tamper


def _validates(path: Path) -> bool:
    try:
        parse(path.read_bytes(), str(path))
    except CurvscopeError:
        return False
    return True


def damaged(base: Path, folder: Path, flips: int = 15, usable: int = 2) -> dict[str, tuple[Path, str]]:
    """Truncations and bit flips of `base`, from fixed seeds: variant id -> (file, message).

    Bit flips are drawn seed after seed until `flips` of them make the file unreadable and
    `usable` of them leave it readable (a flipped number, an unused byte); the rest are skipped.
    """
    raw = base.read_bytes()
    out = {}
    rng = random.Random(13)
    for cut in [0, 7, *sorted(rng.sample(range(8, len(raw) - 1), 12)), len(raw) - 1]:
        path = folder / f"truncated-{cut}.h5"
        path.write_bytes(raw[:cut])
        out[f"truncated at {cut} of {len(raw)} bytes"] = (path, REFUSED)
    wanted = {False: flips, True: usable}
    seed = 0
    while any(wanted.values()):
        path = folder / f"flipped-{seed}.h5"
        path.write_bytes(flipped(raw, seed))
        valid = _validates(path)
        if wanted[valid]:
            wanted[valid] -= 1
            out[f"bits flipped (seed {seed}{', still readable' if valid else ''})"] = (path, REFUSED)
        else:
            path.unlink()
        seed += 1
    return out


def variants(tmp: Path, base: Path, ggn_base: Path | None = None) -> dict[str, tuple[Path, str]]:
    """Every damaged or tampered copy of `base` (and, given `ggn_base`, the K-FAC tampers of it): variant id ->
    (file, message the refusal must match)."""
    folder = tmp / "results-variants"
    folder.mkdir(exist_ok=True)
    out = damaged(base, folder)
    foreign = folder / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh.create_dataset("x", data=np.arange(3))
    out["a foreign HDF5 file"] = (foreign, "not a curvscope results file")
    (tmp / "elsewhere.h5").write_bytes(base.read_bytes())
    for i, (name, (tamper, message)) in enumerate(tampered(tmp).items()):
        path = folder / f"tampered-{i}.h5"
        path.write_bytes(base.read_bytes())
        with h5py.File(path, "r+") as fh:
            tamper(fh, fh[f"checkpoints/{LABEL}"])
        out[f"tampered: {name}"] = (path, message)
    for i, (name, (tamper, message)) in enumerate(kfac_tampered().items() if ggn_base is not None else ()):
        path = folder / f"tampered-kfac-{i}.h5"
        path.write_bytes(ggn_base.read_bytes())
        with h5py.File(path, "r+") as fh:
            tamper(fh, fh[f"checkpoints/{KFAC_LABEL}"])
        out[f"tampered: {name}"] = (path, message)
    return out


def store_cases(tmp: Path) -> list[HostileCase]:
    """Each variant through info, render, audit and analyse -o VARIANT."""
    ckpt, base = results_file(tmp)
    ggn_base = ggn_results_file(tmp, ckpt)
    cases = []
    for name, (path, message) in variants(tmp, base, ggn_base).items():
        valid = _validates(path)  # only a bit flip may leave a usable file
        commands = {"info": ["info", path], "render": ["render", path, "--out-dir", tmp / "figures"],
                    "audit": ["audit", path],
                    "analyse": ["analyse", ckpt, "-o", path, "--no-render", "--no-spectrum", "-q"]}
        for command, args in commands.items():
            expect: int | tuple[int, ...] = 2
            if valid:
                expect = (0, 1) if command == "audit" else 0
            # audit takes a file without HDF5's signature for a checkpoint, and refuses it as one
            said = "" if command == "audit" and not looks_like_hdf5(path.read_bytes()) else message
            cases.append(HostileCase(f"results file {name}: {command}", args, said, expect, protect=[path]))
    return cases
