"""The baseline and the three methods (hybrid, pruning alone, quantization alone) of ResNet-20/CIFAR-10 and
MiniLM/SST-2 at one fine-tuning budget, made with the CLI as a user would: accuracy, parameters, MACs and weight bytes.

Every other section of BENCHMARKS.md measures these runs (`--runs DIR` holds DIR/MODEL/{baseline,quant,prune,hybrid}).
`--size quick` trains on a slice so the whole of `run_all.py --quick` fits in half an hour on 2 cores. Writes
methods.json (its goals judged) to the results directory. Usage:

    .venv/bin/python bench/methods_bench.py --runs DIR [--size full|quick] [--only resnet20|minilm] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, machine, publish, results_dir, run_cli

SHARED = ROOT.parent / "shared"
RESULTS = results_dir() / "methods.json"
HEADING = "Compression: baseline and the three methods"
METHODS = ("hybrid", "prune", "quant")
# (train-limit of the baseline, train-limit of each method, eval-limit); None: the whole split
SIZES = {"full": {"resnet20": (None, None, None), "minilm": (8000, 4000, None)},
         "quick": {"resnet20": (4096, 4096, 2000), "minilm": (1000, 1000, 256)}}
# The goals of `compress` at the plan's default budget (10 epochs for ResNet-20); judged at whatever budget ran.
GOALS = {"resnet20": {"points": 1.0, "params": 0.55, "macs": 0.55, "bytes": 1 / 8},
         "minilm": {"points": 1.5, "encoder_params": 0.7, "bytes": 1 / 6}}


def steps(model: str, size: str) -> dict:
    """The train and compress arguments of one model at one size."""
    base_limit, method_limit, eval_limit = SIZES[size][model]

    def limits(train: int | None) -> list[str]:
        return [*(["--train-limit", str(train)] if train else []), *(["--eval-limit", str(eval_limit)]
                                                                       if eval_limit else [])]

    if model == "resnet20":
        return {"train": ["train", "resnet20", "--data", "cifar10", "--data-dir", str(SHARED / "data/cifar10-jpeg"),
                          "--weights", str(SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"), "--epochs", "1",
                          *limits(base_limit)],
                "compress": ["--epochs", "1", *limits(method_limit)], "prune": [],
                "budget": "baseline: the akamaster ResNet-20 weights fine-tuned 1 epoch on "
                          + (f"{base_limit:,}" if base_limit else "all 49,488") + " JPEG training images; methods: 1 "
                          "epoch on " + (f"{method_limit:,}" if method_limit else "the same") + " images, "
                          "distilling from the baseline; Adam lr 1e-3, batch 64 (the plan's defaults but the epochs)"}
    return {"train": ["train", "minilm", "--data", "sst2", "--data-dir", str(SHARED / "data/sst2"), "--epochs", "1",
                      "--lr", "5e-5", *limits(base_limit)],
            "compress": ["--epochs", "1", "--lr", "5e-5", *limits(method_limit)],
            # 30% of the heads' and FFN neurons' parameters leaves 0.70004x of the encoder with the LayerNorms and
            # hidden-size biases no head or neuron owns; 31% puts it under the 0.7x goal
            "prune": ["--prune-ratio", "0.31"],
            "budget": f"baseline: all-MiniLM-L6-v2 fine-tuned 1 epoch on {base_limit:,} SST-2 sentences; methods: 1 "
                      f"epoch on {method_limit:,}, distilling from the baseline; Adam lr 5e-5, batch 32, max length "
                      "64, pruning ratio 0.31"}


def run(args: list[str], log: Path) -> None:
    rc = run_cli(args, log)
    if rc:
        raise SystemExit(f"step failed ({rc}): see {log}")


def make(model: str, size: str, runs: Path, pool: ThreadPoolExecutor) -> None:
    spec = steps(model, size)
    base = runs / model / "baseline"
    if not (base / "metrics.json").exists():
        pool.submit(run, [*spec["train"], "-o", str(base)], runs / "logs" / f"{model}-baseline.log").result()
    futures = []
    for method in METHODS:
        out = runs / model / method
        if not (out / "metrics.json").exists():
            args = ["compress", str(base), "--method", method, "-o", str(out), *spec["compress"]]
            futures.append(pool.submit(run, args + (spec["prune"] if method != "quant" else []),
                                       runs / "logs" / f"{model}-{method}.log"))
    for f in futures:
        f.result()


def collect(model: str, runs: Path) -> list[dict]:
    rows = []
    for method in ("baseline", *METHODS):
        d = runs / model / method
        m = json.loads((d / "metrics.json").read_text())
        m.pop("history", None)
        m["command"] = json.loads((d / "provenance.json").read_text())["command"]
        if m.get("params_by_part") is None and model == "minilm":
            from hpqdeploy import artifact
            from hpqdeploy.metrics import param_breakdown

            m["params_by_part"] = param_breakdown(artifact.load(d).model.module)
        rows.append(m)
    return rows


def judge(model: str, rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    base, hybrid, goals = by["baseline"], by["hybrid"], GOALS[model]
    gap = 100 * (base["accuracy"] - hybrid["accuracy"])
    out = [{"goal": f"hybrid within {goals['points']} point of the baseline",
            "value": f"{abs(gap):.2f} pt " + ("below" if gap > 0 else "above"),
            "met": gap <= goals["points"] + 1e-9}]
    if "params" in goals:
        out.append({"goal": f"hybrid parameters <= {goals['params']}x", "value": f"{hybrid['params_ratio']:.3f}x",
                    "met": hybrid["params_ratio"] <= goals["params"]})
        out.append({"goal": f"hybrid MACs <= {goals['macs']}x", "value": f"{hybrid['macs_ratio']:.3f}x",
                    "met": hybrid["macs_ratio"] <= goals["macs"]})
    if "encoder_params" in goals:
        enc = hybrid["params_by_part"]["encoder"] / base["params_by_part"]["encoder"]
        out.append({"goal": f"hybrid encoder parameters <= {goals['encoder_params']}x", "value": f"{enc:.3f}x",
                    "met": enc <= goals["encoder_params"]})
    out.append({"goal": f"hybrid weight bytes <= 1/{round(1 / goals['bytes'])} of fp32",
                "value": f"1/{1 / hybrid['bytes_ratio']:.1f}", "met": hybrid["bytes_ratio"] <= goals["bytes"]})
    return out


def markdown(blob: dict) -> str:
    from hpqdeploy.cli.tables import comparison_markdown

    lines = [f"Made by `{blob['command']}` ({blob['seconds']} s).", "",
             "Accuracy on the evaluation split (ResNet-20: CIFAR-10 JPEG test images; MiniLM: the SST-2 dev set), "
             "parameters and MACs of the pruned model, weight bytes at the plan's bit widths (scales included) "
             "against the fp32 baseline. The accuracy goals are set for the plan's default budget (10 epochs for "
             "ResNet-20); the budget below is what fits this run, and the gap shrinks with more epochs "
             "([results log](docs/results-log.md)).", ""]
    for model, res in blob["results"].items():
        lines += [f"### {model}", "", f"Budget: {res['budget']}.", "", comparison_markdown(res["rows"])]
        lines += ["", "Made by:", ""] + [f"- {r['method']}: `{r['command']}`" for r in res["rows"]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--size", choices=tuple(SIZES), default="full")
    ap.add_argument("--only", choices=tuple(GOALS))
    ap.add_argument("--parallel", type=int, default=2, help="CLI processes at a time (one thread each)")
    ap.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)  # run_all's tests
    args = ap.parse_args()
    if args.parse_only:
        return
    runs, start = args.runs.resolve(), time.time()
    models = [args.only] if args.only else list(GOALS)
    with ThreadPoolExecutor(len(models)) as drivers, ThreadPoolExecutor(args.parallel) as pool:
        for f in [drivers.submit(make, m, args.size, runs, pool) for m in models]:
            f.result()
    blob = {"machine": machine(), "size": args.size, "results": {}}
    for m in models:
        rows = collect(m, runs)
        blob["results"][m] = {"rows": rows, "goals": judge(m, rows), "budget": steps(m, args.size)["budget"]}
    blob.update(command=" ".join(["python bench/methods_bench.py", *sys.argv[1:]]), seconds=round(time.time() - start))
    publish(RESULTS, blob, "methods", HEADING, markdown(blob))


if __name__ == "__main__":
    main()
