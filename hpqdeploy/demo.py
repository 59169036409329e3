"""`hpqdeploy demo`: the embedded default (scikit-learn digits, no download), baseline plus the three methods."""

from __future__ import annotations

import shutil
from pathlib import Path

from hpqdeploy.finetune import TrainConfig
from hpqdeploy.pipeline import METHODS, CompressOptions, DataOptions, run_compress, run_train


def run_demo(output: Path, epochs: int = 3, quiet: bool = False) -> list[dict]:
    if output.exists():
        shutil.rmtree(output)
    data = DataOptions("digits", calib_size=128)
    cfg = TrainConfig(epochs=epochs * 4, batch_size=64)
    results = [run_train("resnet20", data, output / "baseline", cfg, quiet=quiet, command="hpqdeploy demo")]
    for method in METHODS:
        opts = CompressOptions(method=method, train=TrainConfig(epochs=epochs, batch_size=64, distill=0.9), calib_batches=2)
        results.append(run_compress(output / "baseline", output / method, opts, quiet=quiet,
                                    command="hpqdeploy demo"))
    return results
