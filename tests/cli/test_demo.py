"""`hpqdeploy demo` runs its experiment file end to end and continues instead of redoing work."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hpqdeploy import demo
from hpqdeploy.cli.app import app

pytest.importorskip("onnxruntime")

# the demo's own file, cut to seconds: fewer examples, one runtime, a short profile, no pictures
SMALL = (demo.CONFIG.replace("calib_size = 128\n", "calib_size = 64\ntrain_limit = 128\neval_limit = 64\n")
         .replace("calib_batches = 2\n\n[export]", "calib_batches = 1\ntrain_limit = 128\n\n[export]")
         .replace('targets = ["onnxruntime", "openvino", "executorch"]', 'targets = ["onnxruntime"]\neval_limit = 32')
         .replace("iters = 100", "iters = 3").replace("repeats = 3", "repeats = 1")
         .replace("idle_seconds = 1.0", "idle_seconds = 0.0\nwarmup_seconds = 0.0")
         .replace("html = true", "html = false"))


def test_demo_runs_every_stage_and_a_rerun_continues(tmp_path, monkeypatch):
    assert SMALL.count("train_limit") == 2 and "warmup_seconds = 0.0" in SMALL  # the cuts above all applied
    monkeypatch.setattr(demo, "CONFIG", SMALL)
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "[1/" in result.stderr and "report:" in result.stderr  # the steps and where the report is, on stderr
    # stdout: the tables only, the one per runtime last (accuracy in the runtime, bytes, latency of batch 1)
    pytorch, runtimes = result.stdout.split("per runtime")
    assert "Δacc (pt)" in pytorch and "hybrid" in pytorch
    header = next(line for line in runtimes.splitlines() if "acc (runtime)" in line)
    assert all(column in header for column in ("runtime", "method", "bytes on disk", "p50 ms x86 b1"))
    rows = [line.split("│")[1:3] for line in runtimes.splitlines() if line.startswith("│")]
    assert sorted((r.strip(), m.strip()) for r, m in rows) == [("onnxruntime", m) for m in sorted(demo.METHODS)]
    assert runtimes.rstrip().endswith("┘")
    state = json.loads((out / "experiment.json").read_text())
    steps = state["steps"]
    assert {"baseline", "compress/hybrid", "compress/prune", "compress/quant", "export/hybrid-onnxruntime",
            "profile/hybrid-onnxruntime-b1", "report"} <= set(steps)
    assert (out / "report" / "report.md").is_file()
    assert "epochs = 4" in (out / "demo.toml").read_text()  # the baseline trains 4x the methods' epochs

    results, summary = demo.run_demo(out, 1, quiet=True)
    assert [r["method"] for r in results] == ["baseline", "hybrid", "prune", "quant"]
    assert summary["counts"]["ran"] == 0 and summary["counts"]["cached"] == len(steps)
    (model,) = demo.runtime_comparison(summary)
    assert [r["method"] for r in model["runtimes"]["onnxruntime"]] == ["baseline", "prune", "quant", "hybrid"]
    assert all(r["profiles"][0]["batch"] == 1 for r in model["runtimes"]["onnxruntime"])

    quiet = CliRunner().invoke(app, ["demo", "-o", str(out), "--epochs", "1", "--quiet"])  # all cached: seconds
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    as_json = CliRunner().invoke(app, ["demo", "-o", str(out), "--epochs", "1", "--json"])
    assert [r["method"] for r in json.loads(as_json.stdout)] == ["baseline", "hybrid", "prune", "quant"]


def test_demo_rejects_zero_epochs(tmp_path):
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), "--epochs", "0"])
    assert result.exit_code != 0
    assert not (tmp_path / "d").exists()
