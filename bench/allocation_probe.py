"""Probe: fine-tune a hand-set pruning allocation or fine-tuning recipe, to test what compress should prefer.

`hpqdeploy compress` chooses each group's kept channels itself (hpqdeploy/core/prune.py `allocate`). This script runs
the same `compress` pipeline with some groups' kept counts overridden, so an allocation the allocator did not pick
can be measured with the same data, fine-tuning and evaluation as the acceptance table; `--seed` repeats a run
with another fine-tuning seed, `--attention` adds attention transfer to the distillation, `--warmup`,
`--mixup`, `--optimizer`, `--lr`, `--reconstruct` and `--importance` pass compress's options of those names. It is an
experiment, not a product feature; its results go to bench/results/allocation_probe.{json,md} beside the command
that made them.

    python bench/allocation_probe.py BASELINE_DIR -o DIR --name NAME [--keep layer1.1.conv1=16 ...] [--method prune]
        [--seed N] [--attention 1000] [--warmup EPOCHS] [--optimizer sgd --lr 0.01] [--reconstruct]
        [--importance magnitude]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from compress_bench import RESNET_EPOCHS  # the epochs of the `resnet20` table
from hpqdeploy.config import OPTIMIZERS, TrainConfig
from hpqdeploy.config import CompressOptions
from hpqdeploy.core import prune
from hpqdeploy.core.importance import CRITERIA
from hpqdeploy.errors import UserError
from hpqdeploy.pipeline import run_compress

RESULTS = Path(__file__).parent / "results" / "allocation_probe.json"
COMPRESS = RESULTS.with_name("compress.json")  # the allocator's own choice, for comparison


def parse_keep(items: list[str]) -> dict[str, int]:
    keep = {}
    for item in items:
        name, _, count = item.partition("=")
        if not count.isdigit():
            sys.exit(f"--keep wants GROUP=COUNT, got {item!r}")
        keep[name] = int(count)
    return keep


def with_overrides(keep: dict[str, int]):
    allocate = prune.allocate

    def overridden(groups, *args, **kwargs):
        choice = allocate(groups, *args, **kwargs)
        unknown = set(keep) - set(choice)
        if unknown:
            raise SystemExit(f"unknown groups {sorted(unknown)}; the model's groups are {sorted(choice)}")
        units = {g.name: g.units for g in groups}
        bad = {n: k for n, k in keep.items() if not 0 < k <= units[n]}
        if bad:
            raise SystemExit(f"kept counts outside 1..units: {bad} (units: { {n: units[n] for n in bad} })")
        return {**choice, **keep}

    return overridden


def _table_rows() -> list[dict]:
    """The current `resnet20` table's prune and hybrid rows: the allocator's own choice, run like the probes."""
    if not COMPRESS.exists():
        return []
    rows = {r["method"]: r for r in json.loads(COMPRESS.read_text())["results"].get("resnet20", {}).get("rows", [])}
    if "baseline" not in rows:
        return []
    return [{**rows[m], "baseline": rows["baseline"]["accuracy"]} for m in ("prune", "hybrid") if m in rows]


def _recipe_text(recipe: dict) -> str:
    parts = [f"seed {recipe['seed']}"]
    if recipe.get("attention"):
        parts.append(f"attention {recipe['attention']:g} at {'/'.join(recipe['attention_layers'])}")
    if recipe.get("warmup"):
        parts.append(f"warmup {recipe['warmup']:g} epoch")
    if recipe.get("mixup"):
        parts.append(f"mixup {recipe['mixup']:g}")
    if recipe.get("optimizer"):
        parts.append(f"{recipe['optimizer']} lr {recipe['lr']:g}")
    if recipe.get("reconstruct"):
        parts.append("reconstruct")
    if recipe.get("importance"):
        parts.append(f"{recipe['importance']} importance")
    return ", ".join(parts)


def markdown(rows: list[dict]) -> str:
    lines = ["# Allocation and recipe probes", "",
             "Hand-set pruning allocations and fine-tuning recipes, fine-tuned like the acceptance table "
             "(bench/allocation_probe.py); accuracy on the full evaluation split. Recipe: compress's defaults "
             "unless stated; the seed is compress's `--seed` (calibration sample, data order, augmentation). "
             "The baseline column is the baseline each row compressed: an 88.55% run (AMD EPYC, AVX2 only) "
             "for most, an 88.37% run (Intel Xeon) for the current table, magnitude-hybrid, "
             "hybrid-e20 and hybrid-e20-s1, the 20-epoch table `resnet20-e20`'s 88.51% baseline "
             "for e20-hybrid-s1, the others named in their commands. Rows from different machines are not "
             "compared with each other.", "",
             "| probe | method | epochs | accuracy | baseline | Δ pt | params | MACs | overrides | recipe | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ref in _table_rows():
        lines.append(f"| allocator's choice (current table `resnet20`) | {ref['method']} | {RESNET_EPOCHS} | "
                     f"{ref['accuracy']:.2%} | "
                     f"{ref['baseline']:.2%} | {100 * (ref['accuracy'] - ref['baseline']):+.2f} | "
                     f"{ref['params_ratio']:.3f}x | {ref['macs_ratio']:.3f}x | none | seed 0 | |")
    for r in rows:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "none"
        lines.append(f"| {r['name']} | {r['method']} | {r['epochs']} | {r['accuracy']:.2%} | "
                     f"{r['baseline_accuracy']:.2%} | {100 * (r['accuracy'] - r['baseline_accuracy']):+.2f} | "
                     f"{r['params_ratio']:.3f}x | {r['macs_ratio']:.3f}x | {over} | "
                     f"{_recipe_text(r.get('recipe', {'seed': 0}))} | "
                     f"{'' if r['seconds'] is None else round(r['seconds'])} |")
    lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path, nargs="?")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--name", help="row name in bench/results/allocation_probe.json")
    ap.add_argument("--keep", nargs="+", default=[], help="GROUP=COUNT overrides of the allocator's choice")
    ap.add_argument("--method", default="prune", choices=("prune", "hybrid"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed (compress's --seed)")
    ap.add_argument("--attention", type=float, default=0.0,
                    help="weight of attention transfer from the baseline (1000 in Zagoruyko & Komodakis)")
    ap.add_argument("--attention-layers", nargs="+", default=["layer1", "layer2", "layer3"])
    ap.add_argument("--warmup", type=float, default=0.0, help="epochs of learning-rate warmup (compress's --warmup)")
    ap.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS, help="compress's --optimizer")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr, help="compress's --lr")
    ap.add_argument("--reconstruct", action="store_true", help="compress's --reconstruct")
    ap.add_argument("--mixup", type=float, default=TrainConfig.mixup, help="compress's --mixup (Beta alpha; 0: off)")
    ap.add_argument("--importance", default=CompressOptions.importance, choices=CRITERIA,
                    help="compress's --importance")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON and stop")
    args = ap.parse_args()
    if args.render_only:
        RESULTS.with_suffix(".md").write_text(markdown(json.loads(RESULTS.read_text())))
        return
    if args.baseline is None or args.output is None or not args.name:
        ap.error("BASELINE, -o and --name are required")
    torch.set_num_threads(1)
    keep = parse_keep(args.keep)
    prune.allocate = with_overrides(keep)
    command = "python " + shlex.join(sys.argv)
    start = time.time()
    opts = CompressOptions(method=args.method, reconstruct=args.reconstruct, importance=args.importance)
    recipe = {"seed": args.seed}
    if args.attention > 0:
        recipe.update(attention=args.attention, attention_layers=tuple(args.attention_layers))
    if args.warmup > 0:
        recipe["warmup"] = args.warmup
    if args.mixup > 0:
        recipe["mixup"] = args.mixup
    if (args.optimizer, args.lr) != (TrainConfig.optimizer, TrainConfig.lr):
        recipe.update(optimizer=args.optimizer, lr=args.lr)
    opts = replace(opts, train=replace(opts.train, epochs=args.epochs, **recipe))  # the rest is compress's default
    if args.reconstruct:
        recipe["reconstruct"] = True
    if args.importance != CompressOptions.importance:
        recipe["importance"] = args.importance
    try:
        metrics = run_compress(args.baseline, args.output, opts, None, True, args.resume, command)
    except (UserError, ValueError) as exc:  # ValueError: an --attention-layers name the model does not have
        sys.exit(f"error: {exc}")
    plan = json.loads((args.output / "plan.json").read_text())
    row = {"name": args.name, "command": command, "method": args.method, "epochs": args.epochs,
           "overrides": keep, "recipe": recipe, "kept": {g["name"]: g["kept"] for g in plan["pruning"]},
           "accuracy": metrics["accuracy"], "baseline_accuracy": metrics["baseline"]["accuracy"],
           "params_ratio": metrics["params_ratio"], "macs_ratio": metrics["macs_ratio"],
           "seconds": round(time.time() - start, 1)}
    record(row)
    print(json.dumps(row, indent=2))


def record(row: dict) -> None:
    """Add or replace `row` in the results, under a lock: probes run two at a time and finish at any moment."""
    with RESULTS.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        rows = [r for r in rows if r["name"] != row["name"]] + [row]
        for path, text in ((RESULTS, json.dumps(rows, indent=2) + "\n"), (RESULTS.with_suffix(".md"), markdown(rows))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)


if __name__ == "__main__":
    main()
