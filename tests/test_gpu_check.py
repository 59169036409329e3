"""bench/gpu_check.sh in a dry run: every step it would run on the GPU machine is printed, and the CPU parts run
here (the install check, the GPU tests' collection, the matched table at one epoch on a slice)."""

import json
import subprocess

import pytest

from conftest import ROOT, SHARED


@pytest.mark.skipif(not (SHARED / "data" / "cifar10-jpeg").is_dir(), reason="needs ../shared/data/cifar10-jpeg")
def test_gpu_check_dry_run(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run",
                             "--shared", str(SHARED)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    for step in ("machine", "venv", "project", "torch sees the GPU", "gpu tests (collected)", "baseline", "hybrid",
                 "prune", "quant"):
        assert f"== {step}:" in result.stdout, step
    blob = json.loads((tmp_path / "out" / "results.json").read_text())
    assert blob["dry_run"] and set(blob["rows"]) == {"baseline", "hybrid", "prune", "quant"}
    assert all(r["compute"]["device"] == "cpu" and r["compute"]["precision"] == "bf16" for r in blob["rows"].values())
    assert blob["rows"]["hybrid"]["macs_ratio"] < 1


def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--epochs", "many"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "error: --epochs must be a whole number, got many"
