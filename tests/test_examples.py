"""The examples in examples/ run end to end on a small slice of the shared data: the Python API in a plain PyTorch
loop (torchvision) and with the Hugging Face Trainer, each saved and exported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *args: str) -> tuple[str, Path]:
    out = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(out), *args],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out


def _check(out: Path, runtime: str = "onnxruntime") -> dict:
    plan = json.loads((out / "plan.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    exported = json.loads((out.with_name(out.name + f"-{runtime}") / "export.json").read_text())
    assert plan["method"] == "hybrid" and any(g["removed"] for g in plan["pruning"])
    assert plan["quantization"], "no layer was quantized"
    assert exported["source"] == str(out) and exported["eval_examples"] > 0
    assert abs(exported["accuracy"] - exported["accuracy_pytorch"]) <= 0.03
    return metrics


@pytest.mark.skipif(not (SHARED / "data" / "cifar10-jpeg").is_dir(), reason="needs ../shared/data/cifar10-jpeg")
def test_torchvision_model_in_a_plain_pytorch_loop(tmp_path):
    stdout, out = _run("torchvision_plain_loop.py", tmp_path, "--train-limit", "512", "--eval-limit", "128",
                       "--epochs", "1")
    metrics = _check(out)
    assert "onnxruntime: accuracy" in stdout
    assert metrics["accuracy"] is not None and metrics["params"] < 11_181_642  # ResNet-18 with 10 classes: smaller


@pytest.mark.skipif(not (SHARED / "data" / "sst2").is_dir(), reason="needs ../shared/data/sst2")
def test_hugging_face_model_with_the_trainer(tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer needs the examples extra")
    stdout, out = _run("hf_trainer_sst2.py", tmp_path, "--train-limit", "128", "--eval-limit", "64",
                       "--max-steps", "2", "--max-length", "32")
    metrics = _check(out)
    assert "onnxruntime: accuracy" in stdout and metrics["accuracy"] is not None
    assert metrics["params_by_part"]  # the pruned transformer's parameters, recorded by part
