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
         .replace("idle_seconds = 1.0", "idle_seconds = 0.0").replace("html = true", "html = false"))


def test_demo_runs_every_stage_and_a_rerun_continues(tmp_path, monkeypatch):
    assert SMALL.count("train_limit") == 2 and "iters = 3" in SMALL  # the cuts above all applied
    monkeypatch.setattr(demo, "CONFIG", SMALL)
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "hybrid" in result.stdout and "report:" in result.output  # the table on stdout, the rest on stderr
    state = json.loads((out / "experiment.json").read_text())
    steps = state["steps"]
    assert {"baseline", "compress/hybrid", "compress/prune", "compress/quant", "export/hybrid-onnxruntime",
            "profile/hybrid-onnxruntime-b1", "report"} <= set(steps)
    assert (out / "report" / "report.md").is_file()
    assert "epochs = 4" in (out / "demo.toml").read_text()  # the baseline trains 4x the methods' epochs

    results, summary = demo.run_demo(out, 1, quiet=True)
    assert [r["method"] for r in results] == ["baseline", "hybrid", "prune", "quant"]
    assert summary["counts"]["ran"] == 0 and summary["counts"]["cached"] == len(steps)


def test_demo_rejects_zero_epochs(tmp_path):
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), "--epochs", "0"])
    assert result.exit_code != 0
    assert not (tmp_path / "d").exists()
