"""Data-parallel train and compress under torchrun (2 CPU ranks, gloo) on a small slice of the shared CIFAR-10:
the same plan as one process, identical parameters on every rank, every evaluation example counted once, one output
directory, and a run killed mid-epoch resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SHARED

CIFAR = SHARED / "data" / "cifar10-jpeg"
pytestmark = pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10-jpeg")
DATA = ["--data-dir", str(CIFAR), "--train-limit", "256", "--eval-limit", "101"]
COMPRESS = ["--prune-ratio", "0.4", "--calib-batches", "2", "--batch-size", "32"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HPQ_DIST_TIMEOUT_MIN": "2"}


def _torchrun(cwd: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "hpqdeploy", *args]


def _run(cwd: Path, *args: str, ranks: int = 2) -> dict:
    cmd = _torchrun(cwd, *args) if ranks > 1 else [sys.executable, "-m", "hpqdeploy", *args]
    result = subprocess.run([*cmd, "--json", "--quiet"], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One baseline (2 ranks), then the hybrid compressed by 2 ranks and by one process."""
    root = tmp_path_factory.mktemp("ddp")
    base = _run(root, "train", "resnet8", "--data", "cifar10", *DATA, "--calib-size", "64", "--epochs", "2",
                "--scratch", "-o", "base")
    ddp = _run(root, "compress", "base", "-o", "hybrid", "--epochs", "1", *COMPRESS)
    one = _run(root, "compress", "base", "-o", "single", "--epochs", "1", *COMPRESS, ranks=1)
    return root, base, ddp, one


def test_the_plan_is_the_one_a_single_process_makes(runs):
    root, _, ddp, one = runs
    a = json.loads((root / "hybrid" / "plan.json").read_text())
    b = json.loads((root / "single" / "plan.json").read_text())
    assert a["pruning"] == b["pruning"] and a["layer_sensitivity"] == b["layer_sensitivity"]
    assert {n: q["bits"] for n, q in a["quantization"].items()} == {n: q["bits"] for n, q in b["quantization"].items()}
    assert ddp["world_size"] == 2 and ddp["global_batch"] == 64 and one["world_size"] == 1


def test_evaluation_counts_every_example_once_and_matches_one_process(runs):
    from hpqdeploy import api
    from hpqdeploy.data import load_data
    from hpqdeploy.training.loop import evaluate, loader

    root, base, ddp, _ = runs
    assert base["eval_examples"] == ddp["eval_examples"] == 101  # odd: no rank pads with a repeated example
    art = api.load(root / "hybrid")
    splits = load_data("cifar10", api.DataOptions(**art.plan["data"]).request(0))
    again = evaluate(art.model.module, loader(splits.eval, art.model.collate, 64, shuffle=False))
    assert again["examples"] == 101 and again["accuracy"] == pytest.approx(ddp["accuracy"], abs=1e-9)


def test_exactly_one_output_directory_per_step(runs):
    root, *_ = runs
    assert sorted(p.name for p in root.iterdir()) == ["base", "hybrid", "single"]
    assert not list(root.glob("*.partial"))


def test_ranks_hold_identical_parameters_after_fine_tuning(tmp_path):
    """Each rank writes a digest of its parameters after `finetune` (the check the runs make on themselves too)."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, hashlib, torch\n"
        "from hpqdeploy.config import ComputeOptions, TrainConfig\n"
        "from hpqdeploy.models.cifar_resnet import CifarResNet\n"
        "from hpqdeploy.training.compute import Compute\n"
        "from hpqdeploy.training.loop import finetune\n"
        "compute = Compute(ComputeOptions(device='cpu'))\n"
        "torch.manual_seed(0)\n"
        "model = CifarResNet(8, num_classes=4)\n"
        "g = torch.Generator().manual_seed(compute.ranks.rank)  # each rank its own data, as a sampler gives it\n"
        "data = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]\n"
        "finetune(model, data, TrainConfig(epochs=2, batch_size=8), quiet=True, compute=compute)\n"
        "blob = b''.join(p.detach().numpy().tobytes() for p in model.state_dict().values())\n"
        "open(f'rank{compute.ranks.rank}.txt', 'w').write(hashlib.sha256(blob).hexdigest())\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()


def test_a_run_killed_mid_epoch_resumes_under_ddp(runs, tmp_path):
    root, *_ = runs
    # 1024 images: 16 steps per rank and epoch, so the second epoch is still running when the first one's checkpoint
    # is seen (with the fixture's 256 it could finish within one poll, and the kill then found epoch 2)
    args = ["compress", str(root / "base"), "-o", "resumed", "--epochs", "2", *COMPRESS, "--train-limit", "1024"]
    proc = subprocess.Popen([*_torchrun(tmp_path, *args), "--quiet"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "resumed.partial" / "compress.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert checkpoint.exists(), "no epoch finished before the deadline"
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks
    proc.wait(timeout=120)
    assert not (tmp_path / "resumed").exists()
    epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert epoch == 1
    resumed = _run(tmp_path, *args, "--resume")
    whole = _run(tmp_path, *[a if a != "resumed" else "whole" for a in args])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    losses = [h["train_loss"] for h in resumed["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in whole["history"]], rel=1e-6)
    assert resumed["accuracy"] == pytest.approx(whole["accuracy"])
