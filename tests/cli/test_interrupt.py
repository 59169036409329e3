"""Interrupted runs, as a user meets them: real `hpqdeploy` processes stopped by SIGINT, SIGTERM or SIGKILL in the
middle of fine-tuning, then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRAIN = ["train", "resnet8", "--data", "digits", "--train-limit", "512", "--eval-limit", "200", "--batch-size", "32"]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hpqdeploy", *args, "--quiet"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _as_from_a_terminal() -> None:
    """Ctrl-C reaches the command as it does from a shell prompt, also where this test runs in a background job
    (which starts its children with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_stop(args: list[str], checkpoint: Path, sig: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Start the command, wait until it has finished an epoch (its checkpoint exists), then send `sig`."""
    proc = subprocess.Popen(_cli(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no checkpoint before the run ended: rc {proc.returncode}\n{err[-2000:]}")
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(args), capture_output=True, text=True, env=_env(), timeout=300)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_run_with_its_exit_code_and_one_line(tmp_path, sig, code):
    out = tmp_path / "baseline"
    done = _start_and_stop([*TRAIN, "--epochs", "5000", "-o", str(out)], tmp_path / "baseline.partial" / "train.ckpt",
                           sig)
    assert done.returncode == code, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("interrupted:") and "--resume" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not out.exists() and (tmp_path / "baseline.partial" / "train.ckpt").is_file()  # nothing complete-looking


def _killed_and_resumed(args: list[str], tmp_path: Path, checkpoint: str) -> tuple[Path, Path]:
    """The command run whole into `whole/`, and into `again/` killed (SIGKILL) after an epoch, then resumed."""
    whole = _run([*args, "-o", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _start_and_stop([*args, "-o", str(tmp_path / "again")], tmp_path / "again.partial" / checkpoint,
                             signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run([*args, "-o", str(tmp_path / "again"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return tmp_path / "whole", tmp_path / "again"


def test_train_killed_then_resumed_equals_the_uninterrupted_run(tmp_path):
    a, b = _killed_and_resumed([*TRAIN, "--epochs", "40"], tmp_path, "train.ckpt")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_compress_resumed_with_other_options_is_refused(tmp_path):
    base = tmp_path / "baseline"
    assert _run([*TRAIN, "--epochs", "1", "-o", str(base)]).returncode == 0
    args = ["compress", str(base), "--epochs", "60", "--train-limit", "256", "-o",
            str(tmp_path / "hybrid")]
    killed = _start_and_stop(args, tmp_path / "hybrid.partial" / "compress.ckpt", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    changed = _run([*args, "--prune-ratio", "0.5", "--resume"])
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1].startswith("error: --resume:")
    assert "--prune-ratio 0.3 (now 0.5)" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert (tmp_path / "hybrid.partial" / "compress.ckpt").is_file()  # the interrupted run is still there to resume


def test_compress_killed_then_resumed_equals_the_uninterrupted_run(tmp_path):
    base = tmp_path / "baseline"
    assert _run([*TRAIN, "--epochs", "1", "-o", str(base)]).returncode == 0
    a, b = _killed_and_resumed(["compress", str(base), "--epochs", "30", "--train-limit", "256"], tmp_path,
                               "compress.ckpt")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "plan.json").read_text() == (b / "plan.json").read_text()
