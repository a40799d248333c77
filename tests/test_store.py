"""The HDF5 results file: schema v1 layout, round trip, refusal of foreign files, atomic writes."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from curvscope.analysis import AnalysisOptions, analyse_checkpoint
from curvscope.errors import CurvscopeError
from curvscope.store import hdf5
from curvscope.store.hdf5 import describe, read_results, stored_labels, write_records

ATTRS = ["source", "sha256", "model", "dataset", "n_samples", "batch_size", "loss", "epoch", "curvature",
         "direction", "partition", "seed", "device", "dtype", "created", "elapsed_s"]
DATASETS = ["partition/name", "partition/kind", "partition/layer", "partition/size", "pseudo_gradient",
            "pseudo_hessian", "pseudo_hessian_stderr", "pseudo_hessian_inverse", "pseudo_hessian_eigenvalues",
            "learning_rates", "predicted_decrease"]

SPECTRUM = ["top/values", "top/residuals", "top/converged", "bottom/values", "bottom/residuals", "bottom/converged",
            "density/grid", "density/density", "density/nodes", "density/weights", "trace", "trace_stderr",
            "normalized_pseudo_hessian_eigenvalues", "blocks/net.1/top/values", "blocks/net.1.weight/trace",
            "blocks/net.1.weight/trace_stderr", "blocks/net.1/top/converged", "blocks/net.1/names"]

INTERACTIONS = ["hessian/normalized", "hessian/off_block_ratio", "hessian/distance_mean", "hessian/distance_max",
                "hessian/distance_count", "inverse/normalized", "inverse/off_block_ratio", "steps/name", "steps/kind",
                "steps/grouping", "steps/learning_rates", "steps/predicted_decrease", "steps/actual_decrease",
                "steps/efficiency", "significant", "significant_count"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def record(tiny_bundle: Path):
    return analyse_checkpoint(tiny_bundle, AnalysisOptions(batch_size=16))[0]  # one record per curvature


def test_layout_of_schema_v1(tmp_path: Path, record) -> None:
    out = tmp_path / "r.h5"
    write_records(out, [record])
    with h5py.File(out) as fh:
        assert fh.attrs["format"] == "curvscope" and fh.attrs["schema_version"] == 1
        assert "curvscope_version" in fh.attrs
        grp = fh["checkpoints/tiny_ep03"]
        assert set(ATTRS) <= set(grp.attrs)
        for name in DATASETS:
            assert name in grp, name
        S = grp["pseudo_gradient"].shape[0]
        assert S == 4 and grp["pseudo_hessian"].shape == (S, S) and grp["pseudo_hessian"].dtype == np.float64
        assert grp["partition/size"].dtype == np.int64
        assert set(grp["pseudo_hessian_inverse"].attrs) >= {"method", "condition_number", "positive_definite"}
        assert grp.attrs["epoch"] == 3 and grp.attrs["n_samples"] == 40
        for name in SPECTRUM:
            assert f"spectrum/{name}" in grp, name
        assert list(grp["spectrum/blocks"].attrs["order"]) == ["net.1.weight", "net.1.bias", "net.3.weight",
                                                               "net.3.bias", "net.1", "net.3"]
        assert grp["spectrum/blocks/net.1"].attrs["kind"] == "layer"
        assert grp["spectrum/blocks/net.1/trace"].attrs["method"] == "hutch++ (shared products)"
        assert "spectrum/blocks/net.1.weight/top" not in grp  # --block-spectra layer: eigenvalues of layers only
        for name in INTERACTIONS:
            assert f"interactions/{name}" in grp, name
        assert grp["interactions/hessian/off_block_ratio"].shape == (2, 4)
        assert grp["interactions/steps/learning_rates"].shape == (6, S)
        assert list(grp["interactions"].attrs["groupings"]) == ["tensor", "layer"]


def test_round_trip(tmp_path: Path, record) -> None:
    out = tmp_path / "r.h5"
    write_records(out, [record])
    (back,) = read_results(out)
    np.testing.assert_array_equal(back["pseudo_hessian"], record.pseudo.pseudo_hessian)
    np.testing.assert_array_equal(back["pseudo_hessian_inverse"], record.step.inverse)
    assert list(back["partition/name"]) == list(record.pseudo.names)
    assert back.attrs["model"] == "mlp" and back.data_attrs["pseudo_hessian_inverse"]["method"] == "inverse"
    assert "tiny_ep03" in describe(out) and "fc" not in stored_labels(out)


def test_several_checkpoints_and_replacement(tmp_path: Path, record) -> None:
    out = tmp_path / "r.h5"
    other = dataclasses.replace(record, label="other")
    write_records(out, [record])
    write_records(out, [other])
    assert stored_labels(out) == ["other", "tiny_ep03"]
    write_records(out, [record])  # replacing a label keeps the others
    assert stored_labels(out) == ["other", "tiny_ep03"]


def test_failed_write_leaves_the_file_exactly_as_it_was(tmp_path: Path, record, monkeypatch) -> None:
    out = tmp_path / "r.h5"
    write_records(out, [record])
    before = digest(out)

    def boom(root, rec):
        root.create_group("half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(hdf5, "_write_record", boom)
    with pytest.raises(KeyboardInterrupt):
        write_records(out, [record])
    assert digest(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("content", ["newer", "foreign", "text"])
def test_refuses_files_it_cannot_own(tmp_path: Path, record, content: str) -> None:
    out = tmp_path / "r.h5"
    if content == "text":
        out.write_text("not hdf5")
    else:
        with h5py.File(out, "w") as fh:
            if content == "newer":
                fh.attrs["format"], fh.attrs["schema_version"] = "curvscope", 99
    before = digest(out)
    with pytest.raises(CurvscopeError, match="newer|not a curvscope|not an HDF5"):
        write_records(out, [record])
    with pytest.raises(CurvscopeError):
        read_results(out)
    assert digest(out) == before


def test_unwritable_location(tmp_path: Path, record) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CurvscopeError, match="cannot write"):
        write_records(blocker / "r.h5", [record])
