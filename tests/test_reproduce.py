"""scripts/reproduce_paper.sh end to end, at tiny scale, on CIFAR-format files the test writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
from conftest import ROOT
from test_files import write_cifar


def test_reproduce_paper_at_tiny_scale(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py", n=8)
    out = tmp_path / "paper"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "LENET_EPOCHS": "1,2",
           "VGG_EPOCHS": "1,2", "VGG_KWARGS": '{"width": 0.0625}', "SAMPLES": "16",
           "ANALYSE_ARGS": "--no-spectrum --batch-size 8"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_paper.sh"), str(tmp_path / "cifar-10-batches-py"),
                           str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("lenet5", "vgg11"):
        with h5py.File(out / f"{model}.h5") as fh:
            assert sorted(fh["checkpoints"]) == [f"{model}_cifar10_ep01", f"{model}_cifar10_ep02"]
            assert fh[f"checkpoints/{model}_cifar10_ep02"].attrs["n_samples"] == 16
        for scale in ("linear", "normalized"):
            assert (out / model / f"trajectory-heatmaps-{scale}.pdf").stat().st_size > 1000
    doc = json.loads((out / "audit.json").read_text())
    assert len(doc["checkpoints"]) == 4 and "summary:" in (out / "audit.txt").read_text()
