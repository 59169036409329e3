"""Subnormal flushing at more than one thread: torch's own switch against `hpqdeploy.denormals.set_flush`.

The flush mode is a per-thread register. `torch.set_flush_denormal(True)` sets the calling thread's; the OpenMP
workers torch has started keep theirs. This script measures, at `--threads` threads, a parallel op on subnormal
floats (multiplying 4M of them by 0.5) under three settings, alternated, the pool started before each: nothing
flushed, torch's switch (the calling thread only), and `set_flush` (every thread of the team). It reports the share
of the op's elements that came out flushed (which threads flush, exactly) and the op's median time; the same op on
normal floats is the floor. First it checks, in a short real `hpqdeploy train`, that the workers do exist by the
time `finetune` sets the flush mode.

    python bench/denormal_threads_bench.py [--threads 2] [--repeats 7] [--calls 20]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, publish
from denormal_bench import cpu_name
from hpqdeploy.denormals import flushed_share, set_flush

RESULTS = ROOT / "bench" / "results" / "denormal_threads.json"
ELEMENTS = 1 << 22
MODES = {
    "nothing flushed": lambda: set_flush(False),
    "torch.set_flush_denormal (calling thread)": lambda: (set_flush(False), torch.set_flush_denormal(True)),
    "hpqdeploy set_flush (every thread)": lambda: set_flush(True),
}


def ms_per_call(x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        torch.mul(x, 0.5)
    return 1000 * (time.perf_counter() - start) / calls


def share_in_training(threads: int) -> float:
    """The share flushed when `finetune` starts in a real `hpqdeploy train` (ResNet-20 on digits, one epoch) if it
    used torch's switch alone: whether the workers already exist by then."""
    from typer.testing import CliRunner

    from hpqdeploy import denormals
    from hpqdeploy.cli.app import app

    seen = []

    def calling_thread_only() -> None:
        torch.set_flush_denormal(True)
        seen.append(flushed_share())

    torch.set_num_threads(threads)
    original, denormals.flush_subnormals = denormals.flush_subnormals, calling_thread_only
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = CliRunner().invoke(app, ["train", "resnet20", "--data", "digits", "--scratch", "--epochs", "1",
                                              "-o", str(Path(tmp) / "baseline"), "--quiet"])
    finally:
        denormals.flush_subnormals = original
    if result.exit_code or not seen:
        raise SystemExit(f"the training run failed: {result.output}")
    return seen[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    in_training = share_in_training(args.threads)
    set_flush(False)
    subnormal = torch.full((ELEMENTS,), 1 << 20, dtype=torch.int32).view(torch.float32)  # 1.47e-39 each
    normal = torch.full((ELEMENTS,), 1e-3)
    torch.mul(normal, 0.5)  # the OpenMP workers exist from here on, as they do by the time training starts
    times: dict[str, list[float]] = {m: [] for m in [*MODES, "normal floats (floor)"]}
    shares: dict[str, float] = {}
    for _ in range(args.repeats):
        for mode, apply in MODES.items():
            apply()
            shares[mode] = flushed_share()
            ms_per_call(subnormal, 2)
            times[mode].append(ms_per_call(subnormal, args.calls))
        set_flush(False)
        times["normal floats (floor)"].append(ms_per_call(normal, args.calls))
    set_flush(False)
    medians = {m: statistics.median(t) for m, t in times.items()}
    command = "python " + shlex.join(sys.argv)
    blob = {"command": command, "threads": args.threads, "elements": ELEMENTS, "calls": args.calls,
            "repeats": args.repeats, "flushed_share": shares, "flushed_share_at_finetune_start": in_training,
            "ms_per_call": times, "median_ms": medians, "cpu": cpu_name(), "torch": torch.__version__}
    rows = [f"| {m} | {f'{shares[m]:.2f}' if m in shares else '-'} | {medians[m]:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in times[m])} |" for m in times]
    section = "\n".join([
        f"Made by `{command}`: {args.threads} threads, `torch.mul` of {ELEMENTS:,} subnormal float32 values by 0.5, "
        f"{args.calls} calls per repeat, the settings alternated in each of {args.repeats} repeats with the "
        "OpenMP workers started before any setting.", "",
        "| setting | share of the op flushed | ms/call (median) | each repeat |", "|---|---|---|---|", *rows, "",
        f"In a real `hpqdeploy train resnet20 --data digits --scratch --epochs 1` at {args.threads} threads, torch's "
        f"switch alone at the start of `finetune` would flush a share of {in_training:.2f}: the workers exist by "
        "then.", "",
        f"CPU: {blob['cpu']}. torch's switch alone leaves the workers' share of every parallel op on the slow path; "
        "`finetune` and `compress` run under `subnormals_flushed`: `set_flush` on every thread for the run, the "
        "previous mode restored after.",
    ])
    publish(RESULTS, blob, "denormal-threads", "Subnormal flushing across threads", section)


if __name__ == "__main__":
    main()
