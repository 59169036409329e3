"""Do the quantization points between layers cost accuracy? Quant-only and hybrid before and after them, at one
fine-tuning budget, from one baseline, on one machine.

The runs are made with the CLI (the commands are recorded with the table): the baseline once; quant-only and hybrid
by the code before the change (a checkout of that commit) and after it; and a probe that isolates the points from
the allocation change that came with them (the hybrid with the former generic channel multiple, 8). This script
reads their metrics and writes bench/results/points_accuracy.json and its section of BENCHMARKS.md. Usage:

    .venv/bin/python bench/points_accuracy.py --runs DIR --before-commit SHA [--render-only]

DIR holds baseline/, before-quant/, before-hybrid/, after-quant/, after-hybrid/ and (optional) after-hybrid-m8/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, machine, machine_markdown, publish, replace_section

RESULTS = ROOT / "bench" / "results" / "points_accuracy.json"
HEADING = "quantization points: accuracy at one budget"
GOAL = 0.3  # points: quant-only and hybrid stay within this of their accuracy before the change
ROWS = (("quant", "before-quant", "after-quant"), ("hybrid", "before-hybrid", "after-hybrid"),
        ("hybrid, channel multiple 8 (probe)", "before-hybrid", "after-hybrid-m8"))


def collect(runs: Path) -> list[dict]:
    rows = []
    for label, before, after in ROWS:
        if not (runs / after / "metrics.json").exists():
            continue
        b, a = (json.loads((runs / d / "metrics.json").read_text()) for d in (before, after))
        plan = json.loads((runs / after / "plan.json").read_text())
        points = plan.get("activation_points") or {}
        rows.append({"method": label, "before": b["accuracy"], "after": a["accuracy"],
                     "delta_points": round(100 * (a["accuracy"] - b["accuracy"]), 2),
                     "macs_ratio": [b.get("macs_ratio"), a.get("macs_ratio")],
                     "params_ratio": [b.get("params_ratio"), a.get("params_ratio")],
                     "channel_multiple": plan.get("channel_multiple"), "points": len(points.get("points", [])),
                     "met": a["accuracy"] >= b["accuracy"] - GOAL / 100 - 1e-9})
    return rows


def markdown(blob: dict) -> str:
    lines = [machine_markdown(blob["machine"]), "", blob["how"], "",
             "| method | before | after | Δ (pt) | MACs before → after | params before → after | points | "
             f"within {GOAL} pt |", "|---|---|---|---|---|---|---|---|"]
    for r in blob["rows"]:
        lines.append(f"| {r['method']} | {100 * r['before']:.2f}% | {100 * r['after']:.2f}% | {r['delta_points']:+.2f} "
                     f"| {r['macs_ratio'][0]}x → {r['macs_ratio'][1]}x | {r['params_ratio'][0]}x → "
                     f"{r['params_ratio'][1]}x | {r['points']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--before-commit", default="")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        replace_section("points_accuracy", HEADING, markdown(json.loads(RESULTS.read_text())))
        return
    base = json.loads((args.runs / "baseline" / "metrics.json").read_text())
    how = (f"Made by `python bench/points_accuracy.py {' '.join(sys.argv[1:])}` from these runs, one seed (0), each "
           "fine-tuned 1 epoch (Adam lr 1e-3, distillation 0.9, batch 64) from one baseline "
           f"({100 * base['accuracy']:.2f}%"
           ": `hpqdeploy train resnet20 --data cifar10 --data-dir ../shared/data/cifar10-jpeg --weights "
           "../shared/models/cifar10-resnet/resnet20-12fca82f.th --epochs 1`); `before-*`: `hpqdeploy compress "
           f"BASELINE --method quant|hybrid --epochs 1` at commit {args.before_commit or '?'} (layer-input quantizers "
           "only); `after-*`: the same command with quantization points; the probe: the hybrid with points but the "
           "former channel multiple (8), so the allocation is the one before the change. Evaluation on all 10,000 "
           "test images in PyTorch.")
    blob = {"rows": collect(args.runs), "machine": machine(), "how": how,
            "command": " ".join(["python bench/points_accuracy.py", *sys.argv[1:]])}
    publish(RESULTS, blob, "points_accuracy", HEADING, markdown(blob))


if __name__ == "__main__":
    main()
