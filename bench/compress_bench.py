"""The compress experiments and ablations of `hpqdeploy compress`: ResNet-20/CIFAR-10 and MiniLM/SST-2 on ../shared.

Runs the CLI exactly as a user would (one subprocess per step, argument lists, one thread each, two at a time),
then writes bench/results/compress.json and the table in BENCHMARKS.md. Usage:

    .venv/bin/python bench/compress_bench.py [--only NAME] [--runs DIR] [--resnet-epochs N] [--parallel N] [--resume]

`resnet20-fade` (gradual removal of the pruned channels), `resnet20-no-kd` (no distillation) and
`resnet20-reconstruct` (least-squares re-fit after the cut) are ablations, and `resnet20-ratio-0.25` and
`resnet20-ratio-0.2` (the hybrid pruning less) points of the accuracy/size trade-off, that compress `resnet20`'s
baseline. `resnet20-sgd` is `resnet20` with SGD in place of Adam, its baseline trained with SGD too.
ResNet results are kept per epoch budget: at the plan's default (10 epochs) under the experiment's name, at any other
budget N under `NAME-eN` (e.g. `resnet20-e6`), so a shorter run never replaces the default's table. `--only` takes
the experiment's name; `--resnet-epochs` picks the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import replace_section, run_cli

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

RESNET_EPOCHS = 10  # the plan's default
OTHER_BUDGETS = (20, 40, 6)  # committed results at other budgets, collected under NAME-eN (and listed in this order)


def resnet_spec(epochs: int) -> dict:
    return {
        "train": ["train", "resnet20", "--data", "cifar10", "--data-dir", str(SHARED / "data/cifar10-jpeg"),
                  "--weights", str(SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"),
                  "--epochs", str(epochs)],
        "compress": ["--epochs", str(epochs)],
        "note": f"baseline and every method: {epochs} epochs over the 49,488 JPEG training images (512 held "
                "out for calibration), Adam lr 1e-3, wd 1e-4, cosine, batch 64; the methods distil from the baseline "
                "(weight 0.9, T 4); pruned channels removed at once; evaluation on all 10,000 test images",
    }


def resnet_no_kd_spec(epochs: int) -> dict:
    """Ablation: prune-only fine-tuned on the labels alone (`--distill 0`), against the same baseline as `resnet20`."""
    spec = resnet_spec(epochs)
    return {"baseline_of": "resnet20", "methods": ("prune",), "compress": [*spec["compress"], "--distill", "0"],
            "note": spec["note"].replace("the methods distil from the baseline (weight 0.9, T 4)",
                                         "no distillation (`--distill 0`): cross-entropy on the labels alone")}


def resnet_reconstruct_spec(epochs: int) -> dict:
    """Ablation: the pruning methods with least-squares reconstruction after the cut, against `resnet20`'s baseline."""
    spec = resnet_spec(epochs)
    return {"baseline_of": "resnet20", "methods": ("hybrid", "prune"), "compress": spec["compress"],
            "prune": ["--reconstruct"],
            "note": spec["note"].replace("pruned channels removed at once",
                                         "pruned channels removed at once, then the layers that read them re-fitted "
                                         "to the baseline's outputs on the 512 calibration images (`--reconstruct`)")}


def resnet_fade_spec(epochs: int, fade: float = 0.3) -> dict:
    """Ablation: the pruning methods with gradual removal, against the same baseline as `resnet20`."""
    from hpqdeploy.config import TrainConfig
    from hpqdeploy.config import CompressOptions

    spec = resnet_spec(epochs)
    n = CompressOptions(train=TrainConfig(epochs=epochs), fade=fade).fade_epochs()
    return {"baseline_of": "resnet20", "methods": ("hybrid", "prune"), "compress": spec["compress"],
            "prune": ["--fade", str(fade)],
            "note": spec["note"].replace("pruned channels removed at once",
                                         f"the pruned channels fade out over the first {n} epochs (`--fade {fade}`), "
                                         "then are removed and the pruned model trains on")}


def resnet_ratio_spec(epochs: int, ratio: float) -> dict:
    """Trade-off: the hybrid at a smaller pruning ratio than the default 0.3, against `resnet20`'s baseline."""
    spec = resnet_spec(epochs)
    return {"baseline_of": "resnet20", "methods": ("hybrid",), "compress": spec["compress"],
            "prune": ["--prune-ratio", str(ratio)],
            "note": spec["note"].replace("pruned channels removed at once",
                                         f"pruning ratio {ratio} (`--prune-ratio {ratio}`; default 0.3), pruned "
                                         "channels removed at once")}


def resnet_sgd_spec(epochs: int, lr: float = 0.01) -> dict:
    """The `resnet20` experiment with SGD (Nesterov, momentum 0.9) in place of Adam, for the baseline and every
    method alike, so the baseline stays a matched control; its own baseline, not `resnet20`'s."""
    spec, recipe = resnet_spec(epochs), ["--optimizer", "sgd", "--lr", str(lr)]
    return {"train": [*spec["train"], *recipe], "compress": [*spec["compress"], *recipe],
            "note": spec["note"].replace("Adam lr 1e-3", f"SGD lr {lr} (Nesterov momentum 0.9; `--optimizer sgd "
                                                         f"--lr {lr}`, the plan's default is Adam lr 1e-3)")}


def resnet_experiments(epochs: int) -> dict:
    """The ResNet experiments at one epoch budget, keyed `NAME` at the default budget and `NAME-eN` otherwise;
    `dir` is where their runs live under --runs (the same at every budget: one --runs directory per budget)."""
    specs = {"resnet20": resnet_spec(epochs), "resnet20-fade": resnet_fade_spec(epochs),
             "resnet20-sgd": resnet_sgd_spec(epochs), "resnet20-no-kd": resnet_no_kd_spec(epochs),
             "resnet20-reconstruct": resnet_reconstruct_spec(epochs),
             **{f"resnet20-ratio-{r}": resnet_ratio_spec(epochs, r) for r in (0.25, 0.2)}}
    return {experiment_key(name, epochs): {**spec, "dir": name} for name, spec in specs.items()}


def experiment_key(name: str, epochs: int) -> str:
    return name if epochs == RESNET_EPOCHS or not name.startswith("resnet") else f"{name}-e{epochs}"


EXPERIMENTS = {
    **resnet_experiments(RESNET_EPOCHS),
    **{k: v for n in OTHER_BUDGETS for k, v in resnet_experiments(n).items()},
    "minilm": {
        "train": ["train", "minilm", "--data", "sst2", "--data-dir", str(SHARED / "data/sst2"), "--epochs", "1",
                  "--lr", "5e-5", "--train-limit", "30000"],
        "compress": ["--epochs", "1", "--lr", "5e-5", "--train-limit", "12000"],
        # The goal is encoder parameters <= 0.7x; removing exactly 30% of the heads' and FFN neurons' parameters
        # leaves 0.7000x plus the LayerNorms and hidden-size biases no head or neuron owns, so ask for 31%.
        "prune": ["--prune-ratio", "0.31"],
        "note": "baseline: 1 epoch over 30,000 SST-2 training sentences, Adam lr 5e-5 (the usual range for a "
                "pretrained transformer; the plan's 1e-3 was not tried here), batch 32, max length 64; methods: 1 "
                "epoch over 12,000 sentences, lr 5e-5, pruning ratio 0.31 (0.30 leaves the encoder at 0.70004x: "
                "LayerNorms and hidden-size biases are not prunable), distilling from the baseline (weight 0.9, T 4); "
                "evaluation on the full 872-sentence dev set",
    },
}
METHODS = ("hybrid", "prune", "quant")


def run(args: list[str], log: Path) -> None:
    rc = run_cli(args, log)
    if rc:
        raise SystemExit(f"step failed ({rc}): see {log}")


def experiment(name: str, runs: Path, pool: ThreadPoolExecutor, resume: bool = False) -> None:
    spec = EXPERIMENTS[name]
    name = spec.get("dir", name)
    base = runs / spec.get("baseline_of", name) / "baseline"
    if not base.exists():
        if "baseline_of" in spec:
            raise SystemExit(f"{name} compresses the {spec['baseline_of']} baseline: run --only {spec['baseline_of']} "
                             "first")
        args = [*spec["train"], "-o", str(base)]
        if resume and base.with_name(base.name + ".partial").exists():
            args.append("--resume")
        pool.submit(run, args, runs / "logs" / f"{name}-baseline.log").result()
    futures = []
    for method in spec.get("methods", METHODS):
        out = runs / name / method
        if not out.exists():
            args = ["compress", str(base), "--method", method, "-o", str(out), *spec["compress"]]
            if resume and out.with_name(out.name + ".partial").exists():
                args.append("--resume")
            if method != "quant":
                args += spec.get("prune", [])
            futures.append(pool.submit(run, args, runs / "logs" / f"{name}-{method}.log"))
    for f in futures:
        f.result()


def collect(runs: Path, previous: dict, names: list[str]) -> dict:
    """Results of the experiments `names` found under `runs`; every other experiment, and one of `names` with no
    run there, keeps its previously committed results."""
    results = {}
    for name, spec in EXPERIMENTS.items():
        if name not in names:
            if name in previous:
                results[name] = previous[name]
            continue
        rows, folder = [], spec.get("dir", name)
        for method in ("baseline", *spec.get("methods", METHODS)):
            d = runs / (spec.get("baseline_of", folder) if method == "baseline" else folder) / method
            if not (d / "metrics.json").exists():
                continue
            m = json.loads((d / "metrics.json").read_text())
            prov = json.loads((d / "provenance.json").read_text())
            plan = json.loads((d / "plan.json").read_text())
            m.pop("history", None)
            if m.get("params_by_part") is None and plan["model"]["family"] == "hf_text":
                from hpqdeploy import artifact
                from hpqdeploy.metrics import param_breakdown

                m["params_by_part"] = param_breakdown(artifact.load(d).model.module)
            m["command"] = prov["command"]
            m["pruning"] = [{k: g[k] for k in ("name", "kind", "units", "kept", "ratio")} for g in plan["pruning"]]
            rows.append(m)
        own = [r for r in rows if "baseline_of" not in spec or r["method"] != "baseline"]  # not just the shared one
        if own:
            kept = {k: v for k, v in previous.get(name, {}).items() if k in ("command", "seconds", "when")}
            results[name] = {"note": spec["note"], "rows": rows, **kept}
        elif name in previous:
            results[name] = previous[name]
    return results


def markdown(results: dict) -> str:
    from hpqdeploy.cli.tables import comparison_markdown

    parts = ["Every row: accuracy on the full evaluation split, parameters and MACs of the pruned model, weight bytes "
             "at the plan's bit widths (scales included) vs the fp32 baseline. CLI processes ran side by side on the "
             "2 cores, one thread each, so wall-clock times are not comparable.\n"]
    for name, blob in results.items():
        rows = blob["rows"]
        wall = (f" ({blob['seconds']} s wall clock)" if blob.get("seconds")
                else f" ({blob['when']})" if blob.get("when") else "")
        made = f"Made by `{blob['command']}`{wall}.\n\n" if blob.get("command") else ""
        parts.append(f"### {name}\n\n{made}{blob['note']}.\n\n{comparison_markdown(rows)}")
        base = next((r for r in rows if r["method"] == "baseline"), None)
        for r in rows:
            if base and r.get("params_by_part") and base.get("params_by_part"):
                enc = r["params_by_part"]["encoder"] / base["params_by_part"]["encoder"]
                parts.append(f"- {r['method']}: encoder params {r['params_by_part']['encoder']:,} "
                             f"({enc:.3f}x of the baseline's); pruned: {r.get('pruned_dimensions') or '-'}; "
                             "hidden size not pruned")
            if r["method"] != "baseline":
                parts.append(f"- {r['method']}: params {r['params_ratio']:.3f}x, MACs {r['macs_ratio']:.3f}x, "
                             f"bytes {r['bytes_ratio']:.4f}x (1/{1 / r['bytes_ratio']:.1f}) of the baseline; "
                             f"accuracy {100 * r['accuracy']:.2f}% vs {100 * r['baseline']['accuracy']:.2f}%"
                             + (f"; pruned channels faded out over {r['fade_epochs']} epochs" if r.get("fade_epochs")
                                else ""))
        hybrid = next((r for r in rows if r["method"] == "hybrid"), None)
        if hybrid and hybrid["pruning"]:
            kept = ", ".join(f"{g['name']} {g['kept']}/{g['units']}" for g in hybrid["pruning"])
            parts.append(f"\nHybrid pruning, kept/original units per group: {kept}.")
        parts.append("\nEach row made by (rows of earlier runs are reused where their inputs did not change):\n")
        parts += [f"- {r['method']}: `{r['command']}`" for r in rows]
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted({spec.get("dir", name) for name, spec in EXPERIMENTS.items()}))
    ap.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--resnet-epochs", type=int, default=RESNET_EPOCHS)
    ap.add_argument("--parallel", type=int, default=2, help="CLI processes at a time (one thread each)")
    ap.add_argument("--resume", action="store_true",
                    help="continue interrupted train and compress steps from their checkpoints")
    args = ap.parse_args()
    args.runs = args.runs.resolve()  # the CLI steps run in the repository root
    budget = resnet_experiments(args.resnet_epochs)
    EXPERIMENTS.update(budget)
    active = [*budget, *(n for n in EXPERIMENTS if not n.startswith("resnet"))]  # this run's epoch budget
    names = [experiment_key(args.only, args.resnet_epochs)] if args.only else active
    start = time.time()
    if not args.collect_only:
        # `--parallel` CLI processes at a time: the experiments' baselines first, then the methods as slots free
        # up; the experiments reusing another's baseline once that one is done.
        for batch in ([n for n in names if "baseline_of" not in EXPERIMENTS[n]],
                      [n for n in names if "baseline_of" in EXPERIMENTS[n]]):
            with ThreadPoolExecutor(max(1, len(batch))) as drivers, ThreadPoolExecutor(args.parallel) as steps:
                for f in [drivers.submit(experiment, n, args.runs, steps, args.resume) for n in batch]:
                    f.result()
    out = ROOT / "bench" / "results" / "compress.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    results = collect(args.runs, previous.get("results", {}), names)
    if not args.collect_only:
        command = " ".join(["python bench/compress_bench.py", *sys.argv[1:]])
        for name in names:
            if name in results:
                results[name].update(command=command, seconds=round(time.time() - start))
    out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    (out.with_suffix(".md")).write_text(markdown(results))
    replace_section("compress", "compress: baseline and methods per experiment", markdown(results))
    print(f"wrote {out}, {out.with_suffix('.md')} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
