"""`hpqdeploy demo`: the embedded default end to end, as one experiment.

ResNet-20 trained on scikit-learn's digits (bundled, no download), then hybrid / prune-only / quant-only, exported
to every runtime whose extra is installed (the others are recorded as skipped, with the reason), profiled on this
CPU and reported. The demo writes its experiment file into the output directory, so `hpqdeploy experiment
OUT/demo.toml` (or running the demo again) continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpqdeploy.errors import UserError

CONFIG = """\
# Written by `hpqdeploy demo`; `hpqdeploy experiment {path}` re-runs or continues it.
[experiment]
name = "demo"
out = "."
seed = 0

[baseline]
model = "resnet20"
data = "digits"
calib_size = 128
epochs = {baseline_epochs}
batch_size = 64

[compress]
methods = ["hybrid", "prune", "quant"]
epochs = {epochs}
batch_size = 64
calib_batches = 2

[export]
targets = ["onnxruntime", "openvino", "executorch"]
calib_batches = 2

[profile]
device = "x86"
batch_sizes = [1]
iters = 100
repeats = 3
warmup = 10
threads = 1
idle_seconds = 1.0

[report]
html = true
"""
METHODS = ("baseline", "hybrid", "prune", "quant")


def run_demo(output: Path, epochs: int = 3, quiet: bool = False) -> tuple[list[dict], dict]:
    """Run (or continue) the demo experiment in `output`; return the four runs' metrics and the experiment summary."""
    from hpqdeploy.experiment.run import run_experiment

    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    config = output / "demo.toml"
    config.write_text(CONFIG.format(path=config, baseline_epochs=4 * epochs, epochs=epochs))
    summary = run_experiment(config, quiet=quiet, command="hpqdeploy demo")
    results = []
    for method in METHODS:
        d = output / "baseline" if method == "baseline" else output / "compress" / method
        results.append(json.loads((d / "metrics.json").read_text()))
    return results, summary


def runtime_comparison(summary: dict) -> list[dict]:
    """The report's rows for what the demo's finished steps wrote: per model, its exports per runtime with their
    profiles (as report.json holds them)."""
    from hpqdeploy.reporting import comparison

    dirs = [Path(r["output"]) for name, r in summary["steps"].items() if r["status"] != "skipped" and name != "report"]
    return comparison(dirs)["models"]
