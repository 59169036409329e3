"""Subnormal floats: the cost of a fine-tuning step with and without flushing them to zero.

A ResNet-20 baseline run (`hpqdeploy train ... --epochs 10`) on an Intel Xeon slowed from about 4.5 minutes an epoch
to about 20 after its second epoch: Adam had left thousands of weights and moments in the subnormal range, and every
operation on one takes a microcode assist on Intel CPUs. `hpqdeploy.denormals.set_flush` now turns on flush
to zero for training. This script measures what that buys from a real run's checkpoint: training steps (batch 64,
one thread) from the checkpoint's weights and optimizer state, flushing off and on, alternated, each repeat
starting again from the checkpoint.

    python bench/denormal_bench.py CHECKPOINT [--model resnet20] [--steps 10] [--repeats 3]

CHECKPOINT is the `train.ckpt` an interrupted `hpqdeploy train` leaves in `OUT.partial/`.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from common import ROOT, publish
from hpqdeploy.models import load_model

RESULTS = ROOT / "bench" / "results" / "denormal.json"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def subnormal(tensors) -> int:
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in tensors if t.is_floating_point())


def fresh(state: dict, model_name: str, num_classes: int):
    model = load_model(model_name, num_classes=num_classes).module
    model.load_state_dict(state["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    opt.load_state_dict(state["optimizer"])
    return model.train(), opt


def seconds_per_step(model, opt, x, y, steps: int) -> float:
    opt.param_groups[0]["lr"] = 0.0  # the state, not the update, is under test; keep it where the checkpoint left it
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    counts = {"weights": subnormal(state["model"].values()), "optimizer_state": subnormal(moments)}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, args.num_classes, (64,), generator=g)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            torch.set_flush_denormal(mode == "on")
            model, opt = fresh(state, args.model, args.num_classes)
            seconds_per_step(model, opt, x, y, 2)  # warm-up; under flushing it also clears the state's subnormals
            times[mode].append(seconds_per_step(model, opt, x, y, args.steps))
    torch.set_flush_denormal(False)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    command = "python " + shlex.join(sys.argv)
    blob = {"command": command, "checkpoint_epoch": state.get("epoch"), "subnormal": counts, "steps": args.steps,
            "repeats": args.repeats, "seconds_per_step": times, "median_off": off, "median_on": on,
            "slowdown": off / on, "cpu": cpu_name(), "torch": torch.__version__}
    section = "\n".join([
        f"Made by `{command}` (checkpoint of epoch {blob['checkpoint_epoch']} of `hpqdeploy train resnet20 ... "
        "--epochs 10`, run before the fix), one thread, batch 64; the step's learning rate set to 0 so every "
        "step sees the checkpoint's state; flushing off and on alternated, each repeat from the checkpoint.", "",
        f"The checkpoint holds {counts['weights']:,} subnormal weights and {counts['optimizer_state']:,} subnormal "
        "optimizer moments.", "",
        "| subnormals | s/step (median) | each repeat |", "|---|---|---|",
        f"| kept (torch's default) | {off:.3f} | {', '.join(f'{t:.3f}' for t in times['off'])} |",
        f"| flushed to zero (`finetune`) | {on:.3f} | {', '.join(f'{t:.3f}' for t in times['on'])} |", "",
        f"Keeping them made each step {off / on:.1f}x slower on this CPU ({blob['cpu']}).",
    ])
    publish(RESULTS, blob, "denormal", "Subnormal floats in fine-tuning", section)


if __name__ == "__main__":
    main()
