"""Where fine-tuning starts after the cut: a compress plan's pruned model, with and without `--reconstruct`.

Applies the pruning plan of a `compress` output to its baseline, re-fits the layers that lost inputs on the same 512
calibration images `compress` uses, and scores the baseline, the one-shot pruned model and the reconstructed one on
the full evaluation split, before any fine-tuning. One thread. Usage:

    .venv/bin/python bench/reconstruct_bench.py [--plan DIR] [--eval-limit N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from common import publish

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from hpqdeploy import artifact
    from hpqdeploy.config import CompressOptions, DataOptions
    from hpqdeploy.core.prune import GroupDecision, apply_pruning
    from hpqdeploy.core.reconstruct import reconstruct
    from hpqdeploy.data import load_data
    from hpqdeploy.training.loop import evaluate, loader

    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", type=Path, default=ROOT / "bench/runs/e6c/resnet20/prune",
                    help="a compress output: its pruning plan and its baseline are used")
    ap.add_argument("--eval-limit", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pruned_artifact = artifact.load(args.plan)
    base_dir = Path(pruned_artifact.provenance["baseline"])
    base = artifact.load(base_dir if base_dir.is_absolute() else ROOT / base_dir)
    decisions = [GroupDecision.from_json(d) for d in pruned_artifact.plan["pruning"]]
    data = DataOptions(**{**pruned_artifact.plan["data"], "eval_limit": args.eval_limit})
    opts = CompressOptions()
    splits = load_data(data.name, data.request(opts.train.seed))
    lm = base.model
    calib = list(loader(splits.calib, lm.collate, opts.train.batch_size, shuffle=False))[:opts.calib_batches]
    evaluation = loader(splits.eval, lm.collate, 128, shuffle=False)

    rows = {"baseline": evaluate(lm.module, evaluation)["accuracy"]}
    pruned = apply_pruning(copy.deepcopy(lm.module), lm.example_inputs, decisions)
    rows["pruned, one-shot"] = evaluate(pruned, evaluation)["accuracy"]
    start = time.time()
    report = reconstruct(pruned, lm.module, lm.example_inputs, decisions, calib)
    seconds = round(time.time() - start, 1)
    rows["pruned, reconstructed"] = evaluate(pruned, evaluation)["accuracy"]

    command = " ".join(["python bench/reconstruct_bench.py", *sys.argv[1:]])
    examples = len(splits.eval)
    plan = args.plan.relative_to(ROOT) if args.plan.is_absolute() else args.plan
    lines = [f"Made by `{command}`: the pruning plan of `{plan}`"
             f" applied to its baseline; accuracy on {examples:,} evaluation examples before any fine-tuning; "
             f"reconstruction on {len(calib)} calibration batches of {opts.train.batch_size} took {seconds} s on one "
             "thread.\n", "| model | accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.2f}% |" for k, v in rows.items()]
    lines += ["", "Relative output error of each re-fitted layer against the baseline's, before → after: "
              + ", ".join(f"{n} {r['error_before']:.2f} → {r['error_after']:.2f}" for n, r in report.items()) + "."]
    publish(ROOT / "bench/results/reconstruct.json",
            {"command": command, "plan": str(args.plan), "eval_examples": examples, "accuracy": rows,
             "seconds": seconds, "layers": report},
            "reconstruct", "reconstruction before fine-tuning", "\n".join(lines))


if __name__ == "__main__":
    main()
