"""The results store against a hostile world (issue #13): damaged and tampered files, concurrent
writers, full disks and I/O errors, file modes, and a store that needs no torch."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import pickle
import random
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hostile_store import LABEL, tampered, words

from curvscope.analysis import AnalysisOptions, analyse_checkpoint
from curvscope.cli.main import main
from curvscope.errors import CurvscopeError
from curvscope.store import atomic, hdf5
from curvscope.store.hdf5 import (
    check_label,
    describe,
    open_results,
    read_results,
    stored_labels,
    write_records,
)
from curvscope.store.lock import exclusive_lock, lock_path
from curvscope.store.reader import looks_like_hdf5, parse
from curvscope.store.schema import RESULTS, Attr, Data, Group

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flat(exc: pytest.ExceptionInfo) -> str:
    return " ".join(str(exc.value).split())


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny bundle analysed with spectra ("full") and without ("bare"), once for the module."""
    from conftest import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path_factory.mktemp("bundle") / f"{LABEL}.pt")
    full = analyse_checkpoint(bundle, AnalysisOptions(batch_size=16))[0]  # one record per curvature: the Hessian's
    return {"full": full, "bare": dataclasses.replace(full, spectrum=None)}


@pytest.fixture
def results(tmp_path: Path, records: dict) -> Path:
    out = tmp_path / "r.h5"
    write_records(out, [records["full"]])
    return out


def leftovers(folder: Path) -> list[str]:
    """Hidden files (temporary files, locks) left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- reading: what today's writer produces ------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "reports").glob("*.h5")), ids=lambda p: p.name)
def test_shipped_results_files_read(path: Path) -> None:
    checkpoints = read_results(path)
    assert checkpoints and all(ck["pseudo_hessian"].shape == (len(ck["pseudo_gradient"]),) * 2 for ck in checkpoints)
    assert "positive definite:" in describe(path)


def test_writer_output_reads_back_with_and_without_spectrum(tmp_path: Path, records: dict) -> None:
    out = tmp_path / "r.h5"
    write_records(out, [records["bare"], dataclasses.replace(records["full"], label="with")])
    bare, full = {ck.label: ck for ck in read_results(out)}.values()
    assert not any(k.startswith("spectrum/") for k in bare.data)
    assert full["spectrum/top/values"].shape == (5,) and full.data_attrs["spectrum/blocks/net.1"]["kind"] == "layer"
    assert open_results(out).schema_version == 1 and stored_labels(out) == [LABEL, "with"]


def test_file_of_an_older_curvscope_without_interactions_reads(results: Path) -> None:
    with h5py.File(results, "r+") as fh:
        del fh[f"checkpoints/{LABEL}/interactions"]
    (ck,) = read_results(results)
    assert "interactions/steps/efficiency" not in ck.data


def test_members_the_schema_does_not_declare_are_left_alone(results: Path) -> None:
    with h5py.File(results, "r+") as fh:
        fh[f"checkpoints/{LABEL}"].create_dataset("from_the_future", data=np.arange(3))
        fh[f"checkpoints/{LABEL}"].attrs["notes"] = np.arange(2)
        fh[f"checkpoints/{LABEL}"].attrs["note"] = "from a newer writer"
    (ck,) = read_results(results)
    assert "from_the_future" not in ck.data and "notes" not in ck.attrs  # neither read
    assert ck.attrs["note"] == "from a newer writer"  # a scalar attribute is passed on


def test_an_empty_results_file_holds_no_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "r.h5"
    with h5py.File(out, "w") as fh:
        fh.attrs["format"], fh.attrs["schema_version"] = "curvscope", 1
    assert read_results(out) == [] and "no checkpoints" in describe(out)


# --- reading: damage and tampering ----------------------------------------------------------------

@pytest.mark.parametrize("name", list(tampered(Path("/nonexistent"))))
def test_each_schema_violation_is_named(tmp_path: Path, results: Path, name: str) -> None:
    tamper, message = tampered(tmp_path)[name]
    (tmp_path / "elsewhere.h5").write_bytes(results.read_bytes())
    with h5py.File(results, "r+") as fh:
        tamper(fh, fh[f"checkpoints/{LABEL}"])
    before = digest(results)
    with pytest.raises(CurvscopeError) as exc:
        read_results(results)
    text = str(exc.value)
    assert re.search(message, flat(exc)), text
    assert "\n" not in text and ("intact copy" in text or "not a curvscope" in text), text
    assert digest(results) == before


def test_truncation_at_any_offset_is_refused(results: Path) -> None:
    raw = results.read_bytes()
    for cut in range(0, len(raw), max(1, len(raw) // 300)):
        with pytest.raises(CurvscopeError, match="not an HDF5 file|results file"):
            parse(raw[:cut], "r.h5")


def test_bit_flips_are_refused_or_read_never_crash(results: Path) -> None:
    raw, rng = results.read_bytes(), random.Random(5)
    refused = 0
    for _ in range(200):
        data = bytearray(raw)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        try:
            parse(bytes(data), "r.h5")
        except CurvscopeError:
            refused += 1
    assert refused > 20  # flips in the metadata are caught; most flips land in numbers


@pytest.mark.parametrize("error", [OSError, KeyError, TypeError, ValueError, RuntimeError])
@pytest.mark.parametrize("where", ["dataset", "attribute"])
def test_whatever_hdf5_raises_while_reading_becomes_a_curvscope_error(results: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       error: type, where: str) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error("simulated HDF5 failure")

    target = h5py.Dataset if where == "dataset" else h5py.AttributeManager
    monkeypatch.setattr(target, "__getitem__", fail)
    with pytest.raises(CurvscopeError, match="simulated HDF5 failure"):
        read_results(results)


def test_no_hdf5_diagnostics_on_stderr(results: Path, capfd: pytest.CaptureFixture) -> None:
    raw = results.read_bytes()
    for cut in (100, 2000, len(raw) // 2):
        with pytest.raises(CurvscopeError):
            parse(raw[:cut], "r.h5")
    assert "HDF5-DIAG" not in capfd.readouterr().err


def test_hdf5_signature_after_a_user_block_is_found(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "u.h5", "w", userblock_size=1024) as fh:
        fh.attrs["format"], fh.attrs["schema_version"] = "curvscope", 1
    assert looks_like_hdf5((tmp_path / "u.h5").read_bytes()) and read_results(tmp_path / "u.h5") == []
    assert not looks_like_hdf5(b"PK\x03\x04" + bytes(4000))


def test_newer_schema_is_refused_before_its_layout_is_checked(results: Path) -> None:
    with h5py.File(results, "r+") as fh:
        fh.attrs["schema_version"] = 2
        del fh["checkpoints"]
        fh.create_dataset("checkpoints", data=1)
    with pytest.raises(CurvscopeError, match="newer.*upgrade curvscope"):
        open_results(results)


# --- describe -----------------------------------------------------------------------------------

def test_describe_makes_no_claim_about_a_non_finite_hessian(results: Path) -> None:
    with h5py.File(results, "r+") as fh:
        ph = fh[f"checkpoints/{LABEL}/pseudo_hessian"]
        ph[0, 0] = np.nan
        fh[f"checkpoints/{LABEL}/pseudo_hessian_inverse"].attrs["positive_definite"] = True
    text = describe(results)
    assert "H̄ has non-finite entries" in text and "positive definite: True" not in text


def test_describe_reports_the_stored_flag_faithfully(results: Path) -> None:
    with h5py.File(results, "r+") as fh:
        fh[f"checkpoints/{LABEL}/pseudo_hessian_inverse"].attrs["positive_definite"] = True
    assert "positive definite: True" in describe(results)


# --- the schema declaration itself ---------------------------------------------------------------

def _dims_used(spec: Group | Data | Attr) -> set[str]:
    shapes = [spec.shape] if not isinstance(spec, Group) else []
    attrs = spec.attrs.values() if not isinstance(spec, Attr) else []
    members = [*spec.members.values(), *([spec.each] if spec.each else [])] if isinstance(spec, Group) else []
    used = {d for shape in shapes for d in shape if isinstance(d, str)}
    used |= {d for a in attrs for d in a.shape if isinstance(d, str)}
    for m in members:
        used |= _dims_used(m) - set(m.dims if isinstance(m, Group) else {})
    return used


def test_every_named_dimension_is_declared_by_an_enclosing_group() -> None:
    assert _dims_used(RESULTS) == set()


# --- writing: labels, locks, concurrency ---------------------------------------------------------

@pytest.mark.parametrize("label", ["a\nb", "a/b", ".", "", "bad\udcff"])
def test_labels_that_cannot_name_a_group_are_refused(label: str) -> None:
    with pytest.raises(CurvscopeError, match="checkpoint label"):
        check_label(label)


def test_a_writer_waits_for_the_lock_and_says_so(tmp_path: Path, records: dict) -> None:
    out, messages = tmp_path / "r.h5", []
    with exclusive_lock(out):
        writer = threading.Thread(target=write_records, args=(out, [records["bare"]]),
                                  kwargs={"on_wait": messages.append})
        writer.start()
        deadline = time.monotonic() + 30
        while not messages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not out.exists()  # still waiting
    writer.join(60)
    assert messages == ["waiting for another curvscope process writing r.h5"]
    assert stored_labels(out) == [LABEL]
    assert leftovers(tmp_path) == []  # the lock file goes with its last holder


def test_the_lock_is_released_when_the_write_fails(tmp_path: Path, records: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r.h5"
    monkeypatch.setattr(hdf5, "_write_record", lambda root, rec: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_records(out, [records["bare"]])
    monkeypatch.undo()
    write_records(out, [records["bare"]], on_wait=lambda m: pytest.fail(m))
    assert stored_labels(out) == [LABEL] and not lock_path(out).exists()


WRITER = """
import dataclasses, pickle, sys, time
from pathlib import Path
from curvscope.store.hdf5 import write_records
rec_file, out, rounds, ready, go = sys.argv[1:]
rec = pickle.loads(Path(rec_file).read_bytes())
Path(ready).touch()
while not Path(go).exists():  # start together
    time.sleep(0.01)
waits = []
for i in range(int(rounds)):  # a new label each round: a lost update would lose one
    write_records(Path(out), [dataclasses.replace(rec, label=f"{rec.label}{i:02d}")], on_wait=waits.append)
print(len(waits))
"""


def test_concurrent_writers_lose_no_label(tmp_path: Path, records: dict) -> None:
    out, go, labels, rounds = tmp_path / "r.h5", tmp_path / "go", ("left", "right"), 12
    procs = []
    for label in labels:
        (tmp_path / f"{label}.pkl").write_bytes(pickle.dumps(dataclasses.replace(records["bare"], label=label)))
        args = [str(tmp_path / f"{label}.pkl"), str(out), str(rounds), str(tmp_path / f"{label}.ready"), str(go)]
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{label}.ready").exists() for label in labels) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # every label of both (without the lock, one run kept 12 of the 24)
    assert stored_labels(out) == [f"{label}{i:02d}" for label in labels for i in range(rounds)]
    assert sum(int(o.strip()) for o, _ in outputs) > 0  # they did contend for the lock
    assert leftovers(tmp_path) == []


def test_concurrent_writers_take_turns_at_every_write(tmp_path: Path, records: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of two threads rewrites the file while the other also does: with the lock every label survives."""
    out, errors = tmp_path / "r.h5", []

    def loop(label: str) -> None:
        try:
            for _ in range(10):
                write_records(out, [dataclasses.replace(records["bare"], label=label)])
                assert label in stored_labels(out)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(label,)) for label in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and stored_labels(out) == ["a", "b", "c"]


# --- writing: faults ----------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["write", "fsync", "replace"])
@pytest.mark.parametrize("existing", [True, False], ids=["existing", "new"])
def test_a_full_disk_or_io_error_leaves_the_old_file_and_no_temporary(tmp_path: Path, records: dict,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      fault: str, existing: bool) -> None:
    out = tmp_path / "r.h5"
    if existing:
        write_records(out, [records["bare"]])
    before = digest(out) if existing else None
    code = errno.ENOSPC if fault == "write" else errno.EIO

    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, fault, fail)
    with pytest.raises(CurvscopeError, match=os.strerror(code)):
        write_records(out, [dataclasses.replace(records["bare"], label="new")])
    monkeypatch.undo()
    assert (digest(out) if existing else out.exists()) == (before if existing else False)
    assert leftovers(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 96 KiB tmpfs (skipped where this process may not mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], check=False,
                              capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk(tiny_disk: Path, records: dict) -> None:
    out = tiny_disk / "r.h5"
    write_records(out, [records["bare"]])
    before = digest(out)
    with pytest.raises(CurvscopeError, match="No space left on device"):
        write_records(out, [dataclasses.replace(records["full"], label=f"more{i}") for i in range(3)])
    assert digest(out) == before and leftovers(tiny_disk) == []


def test_the_cli_exits_2_on_a_full_disk(tiny_disk: Path, tmp_path: Path) -> None:
    from conftest import write_tiny_bundle

    out = tiny_disk / "r.h5"
    first = write_tiny_bundle(tmp_path / "a.pt")
    assert CliRunner().invoke(main, ["analyse", str(first), "-o", str(out), "--no-render", "-q",
                                     "--no-spectrum"]).exit_code == 0
    before = digest(out)
    more = [str(write_tiny_bundle(tmp_path / f"b{i}.pt", epoch=i)) for i in range(3)]
    res = CliRunner().invoke(main, ["analyse", *more, "-o", str(out), "--no-render", "-q"])
    assert res.exit_code == 2 and "No space left on device" in " ".join(res.output.split()), res.output
    assert digest(out) == before or set(stored_labels(out)) > {"a"}  # a label written before the disk filled
    assert leftovers(tiny_disk) == []


# --- writing: modes -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o664])
def test_a_rewritten_file_keeps_its_mode(results: Path, records: dict, mode: int) -> None:
    results.chmod(mode)
    write_records(results, [dataclasses.replace(records["bare"], label="more")])
    assert stat.S_IMODE(results.stat().st_mode) == mode


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_new_file_follows_the_umask(tmp_path: Path, records: dict, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_records(tmp_path / "r.h5", [records["bare"]])
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "r.h5").stat().st_mode) == 0o666 & ~umask


# --- the store needs no torch -----------------------------------------------------------------------

def test_the_store_imports_without_torch() -> None:
    code = ("import sys, curvscope.store.hdf5, curvscope.store.reader, curvscope.store.schema, "
            "curvscope.store.lock, curvscope.store.atomic; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr


def test_messages_name_the_file_and_what_to_do(results: Path) -> None:
    with h5py.File(results, "r+") as fh:
        del fh[f"checkpoints/{LABEL}/pseudo_hessian"]
        fh[f"checkpoints/{LABEL}"].create_dataset("pseudo_hessian", data=np.zeros((4, 3)))
    with pytest.raises(CurvscopeError) as exc:
        read_results(results)
    assert re.search(words(f"{str(results)!r} is not a valid curvscope results file: checkpoint '{LABEL}': "
                           "dataset pseudo_hessian has shape (4, 3), expected (S, S) = (4, 4)"), flat(exc))
    assert "intact copy" in flat(exc) and "-o NEW.h5" in flat(exc)
