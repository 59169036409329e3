"""Every benchmark section on this machine, one after another, then BENCHMARKS.md and its picture from the results.

Sections, in order (each a script of its own in bench/, writing its results JSON headed by the machine block):

1. `methods`: ResNet-20/CIFAR-10 and MiniLM/SST-2, baseline and the three methods, made with the CLI;
2. `runtimes`: those runs exported to ONNX Runtime, OpenVINO and ExecuTorch beside each runtime's own INT8 tool,
   accuracy inside the runtime, bytes, batch-1 and batch-32 latency, timed round-robin in one process;
3. `profile`: `hpqdeploy profile --device x86` of the baseline and hybrid exports;
4. `widths`: the channel widths each runtime runs fast (what `targets/*.toml` records);
5. `training`: fine-tuning throughput per compute setting, and the accuracy of the fastest.

The CPU-heavy training comes first and the timing sections last. BENCHMARKS.md is written only from results that all
carry the same machine block (CPU model, ISA flags, cores): a section measured elsewhere is refused, never mixed in.
The full size is what fits a 2-core machine in about 1.5 hours; `--quick` (under 30 minutes: 24.4 on the machine in
BENCHMARKS.md) trains and evaluates on slices and times fewer calls, and writes everything under `--out` (default
bench/runs/quick), never over the committed results.
Usage:

    .venv/bin/python bench/run_all.py [--quick] [--only SECTION ...] [--runs DIR] [--out DIR] [--render-only]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import PINNED, machine_markdown  # noqa: E402

PICTURE = "accuracy-vs-latency.png"


@dataclass(frozen=True)
class Section:
    key: str
    heading: str
    script: str  # bench/SCRIPT.py: runs the measurement, and its `markdown(blob)` renders it
    results: str  # its JSON in the results directory
    goal: str  # what the section is for, in a sentence
    args: Callable[[str, Path, Path], list[str]]  # (size, runs, results) -> the script's arguments
    judge: Callable[[dict], list[dict]]  # results -> goals: {"goal", "value", "met"}


def _judged_per_model(script: str) -> Callable[[dict], list[dict]]:
    """The goals of a per-model section, judged from its rows by the section script's own `judge(model, rows)`."""
    def judge(blob: dict) -> list[dict]:
        module = importlib.import_module(script)
        return [{**g, "goal": f"{model}: " + (f"{g['runtime']} {g['source']}: " if "runtime" in g else "") + g["goal"]}
                for model, res in blob["results"].items() for g in module.judge(model, res["rows"])]
    return judge


def _profile_goals(blob: dict, spread: float = 0.10) -> list[dict]:
    goals = []
    for model, rows in blob["results"].items():
        worst = max(rows, key=lambda r: r["p50_spread"])
        goals.append({"goal": f"{model}: p50 of the repeats within {spread:.0%} of each other, every row",
                      "value": f"{100 * worst['p50_spread']:.1f}% at most ({worst['artifact']} b{worst['batch']})",
                      "met": worst["p50_spread"] <= spread})
        base = {(r["artifact"].split("/")[1], r["batch"]): r for r in rows if r["artifact"].startswith("baseline/")}
        hybrid = [(r, base[(r["artifact"].split("/")[1], r["batch"])]) for r in rows
                  if r["artifact"].startswith("hybrid/") and (r["artifact"].split("/")[1], r["batch"]) in base]
        if hybrid:
            slowest = min(hybrid, key=lambda rb: rb[1]["p50_ms"] / rb[0]["p50_ms"])
            speed = slowest[1]["p50_ms"] / slowest[0]["p50_ms"]
            goals.append({"goal": f"{model}: hybrid faster than the baseline on every runtime and batch size",
                          "value": f"{speed:.2f}x at least ({slowest[0]['artifact']} b{slowest[0]['batch']})",
                          "met": speed > 1.0})
    return goals


def _width_goals(blob: dict) -> list[dict]:
    """Is the conv multiple each target records for this ISA family the one measured here?"""
    goals = []
    for r in blob["results"]:
        if r["kind"] != "conv":
            continue
        target = tomllib.loads((ROOT / "targets" / f"{r['runtime']}.toml").read_text())
        recorded = target.get("channel_multiple_by_isa", {}).get(blob["isa_family"], target.get("channel_multiple"))
        goals.append({"goal": f"targets/{r['runtime']}.toml: conv channel multiple for `{blob['isa_family']}` is the "
                      "measured one", "value": f"recorded {recorded}, measured {r['multiple']}",
                      "met": recorded == r["multiple"]})
    return goals


def _training_goals(blob: dict) -> list[dict]:
    from train_throughput_bench import GOAL_POINTS, GOAL_SPEEDUP

    fastest, acc = blob["fastest"], blob["accuracy"]
    speed = blob["resnet20"][fastest]["speedup"]
    return [{"goal": f"fastest setting at least {GOAL_SPEEDUP:.0f}x the plain fp32 loop", "value": f"{fastest}: "
             f"{speed:.2f}x", "met": speed >= GOAL_SPEEDUP},
            {"goal": f"the fastest within {GOAL_POINTS} point of fp32 fine-tuning",
             "value": f"{acc['points_below_fp32']:.2f} pt below", "met": acc["points_below_fp32"] <= GOAL_POINTS}]


QUICK = "quick"
SECTIONS = (
    Section("methods", "Compression: baseline and the three methods", "methods_bench", "methods.json",
            "how much smaller the hybrid, pruning alone and quantization alone make each model, and what accuracy "
            "they cost against the baseline they started from",
            lambda size, runs, results: ["--runs", str(runs), "--size", size], _judged_per_model("methods_bench")),
    Section("runtimes", "On each runtime, against the runtime's own INT8 tool", "fast_path_bench", "fast_path.json",
            "whether the compressed model is smaller and faster on each runtime than what the runtime's own "
            "post-training tool makes from the same baseline, at what accuracy measured inside the runtime",
            lambda size, runs, results: ["--runs", str(runs), "--budget", _budget(results),
                                *(["--iters-b1", "50", "--iters-b32", "8", "--repeats", "2"] if size == QUICK else [])],
            _judged_per_model("fast_path_bench")),
    Section("profile", "Profile on this CPU", "profile_bench", "profile.json",
            "latency percentiles, throughput and memory of the baseline and hybrid exports as `hpqdeploy profile` "
            "reports them, and whether repeats agree",
            lambda size, runs, results: ["--runs", str(runs), *(["--iters-factor", "0.25", "--warmup-seconds", "0",
                                                                  "--min-seconds", "0"] if size == QUICK else [])],
            _profile_goals),
    Section("widths", "Channel widths the runtimes run fast", "width_bench", "width.json",
            "which channel counts each runtime's kernels run fast on this CPU, the multiple pruning rounds to",
            lambda size, runs, results: ["--iters", "10", "--repeats", "2"] if size == QUICK else [], _width_goals),
    Section("training", "Training throughput per compute setting", "train_throughput_bench", "train_throughput.json",
            "how fast fine-tuning runs per compute setting on this CPU, and whether the fastest keeps the accuracy",
            lambda size, runs, results: ["--runs", str(runs / "train-throughput"),
                                *(["--images", "512", "--text", "128", "--repeats", "1", "--epochs", "1",
                                   "--finetune-limit", "4096"]
                                  if size == QUICK else [])],
            _training_goals),
)
BY_KEY = {s.key: s for s in SECTIONS}


def _budget(results: Path) -> str:
    """How the runs were made, from the methods section's results (written just before)."""
    blob = json.loads((results / "methods.json").read_text())
    return "; ".join(f"{model}: {res['budget']}" for model, res in blob["results"].items())


def machine_key(m: dict) -> tuple:
    """What decides whether two results may share a table: the CPU model, its ISA flags and the core count."""
    return m["cpu"], tuple(m["isa"]), m["cores"]


class MixedMachines(ValueError):
    pass


def load_results(results: Path, sections: tuple[Section, ...] = SECTIONS) -> tuple[dict, dict[str, dict]]:
    """The results of every section found in `results`, and the one machine they were all measured on."""
    blobs = {s.key: json.loads((results / s.results).read_text()) for s in sections if (results / s.results).exists()}
    if not blobs:
        raise FileNotFoundError(f"no results in {results}")
    first_key, first = next(iter(blobs.items()))
    for key, blob in blobs.items():
        if "machine" not in blob:
            raise MixedMachines(f"{key}: its results carry no machine block")
        if machine_key(blob["machine"]) != machine_key(first["machine"]):
            raise MixedMachines(f"{key} was measured on {machine_markdown(blob['machine'])} but {first_key} on "
                                f"{machine_markdown(first['machine'])}: run them again on one machine")
    return first["machine"], blobs


def _continued(commands: list[str]) -> str:
    """" (then `A`, then `B` ran the sections they name again)": what ran again after the first command."""
    if not commands:
        return ""
    names = ", then ".join(f"`{c}`" for c in commands)
    return f" (then {names} ran the sections {'it names' if len(commands) == 1 else 'they name'} again)"


def render(results: Path, picture: Path | None, picture_link: str) -> str:
    """BENCHMARKS.md from the results in `results` (and the picture, drawn to `picture` when given)."""
    m, blobs = load_results(results)
    run = json.loads((results / "run_all.json").read_text()) if (results / "run_all.json").exists() else {}
    judged = {key: BY_KEY[key].judge(blob) for key, blob in blobs.items()}
    lines = ["# Benchmarks", "",
             "Every figure on this page was measured on the one machine below, in one run of "
             f"`{run.get('command', 'python bench/run_all.py')}`"
             + _continued(list(dict.fromkeys(run.get("continued", []))))
             + ", and is rendered from the results JSON in "
             "`bench/results/` (each carries the same machine block and the command that made it). Regenerate "
             f"everything with `python bench/run_all.py` ({total_minutes(run)} minutes in this run; `--quick` for a "
             "reduced run of about 25 minutes, written under bench/runs/quick). Ablations and earlier "
             "measurements, each dated with its machine, are in the "
             "[results log](docs/results-log.md).", "",
             f"**{machine_markdown(m)}**", "", "## Goals at a glance", "", "| section | goals met |", "|---|---|"]
    for key in blobs:
        s, goals = BY_KEY[key], judged[key]
        lines.append(f"| [{s.heading}](#{anchor(s.heading)}) | {sum(g['met'] for g in goals)} of {len(goals)} |")
    if picture is not None and "runtimes" in blobs:
        draw(blobs["runtimes"], picture)
        lines += ["", f"![accuracy against batch-1 latency]({picture_link})", "",
                  "Accuracy inside each runtime against batch-1 latency (one thread): the baseline, the three methods "
                  "and the runtime's own INT8 tool, with the Pareto front "
                  f"([data](#{anchor(BY_KEY['runtimes'].heading)}))."]
    for key, blob in blobs.items():
        s = BY_KEY[key]
        module = importlib.import_module(s.script)
        record = run.get("sections", {}).get(key, {})
        seconds = record.get("seconds", blob.get("seconds"))
        load = (f"; 1-minute load average {record['load'][0]} at the start, {record['load'][1]} at the end, on "
                f"{m['cores']} cores" if record.get("load") else "")
        lines += ["", f"## {s.heading}", "", f"Goal: {s.goal}.", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in judged[key]]
        own = [line for line in module.markdown(blob).rstrip().splitlines() if not line.startswith("Machine: ")]
        if seconds:
            lines += ["", f"Wall time {round(seconds)} s{load}."]
        lines += ["", "\n".join(own).strip()]
    return "\n".join(lines) + "\n"


def headline(results: Path) -> str:
    """The README's table: per model and runtime, the baseline, the hybrid and the runtime's own INT8 tool."""
    m, blobs = load_results(results)
    section = BY_KEY["runtimes"]
    link = f"BENCHMARKS.md#{anchor(section.heading)}"
    run = json.loads((results / "run_all.json").read_text()) if (results / "run_all.json").exists() else {}
    load = run.get("sections", {}).get("runtimes", {}).get("load")
    busy = (f" The 1-minute load average was {load[0]} to {load[1]} while it ran: another job shared the cores, so "
            "absolute times are higher than on an idle machine; every row was timed round-robin in one process, so "
            "the rows compare fairly." if load and max(load) > 1.2 else "")
    lines = [f"Measured by `python bench/run_all.py` on {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, one "
             f"thread per runtime, {m['date']}; every figure from [{section.heading}]({link}), where the budgets, "
             f"the quantization-only and pruning-only rows and the goals are.{busy}", "",
             "| model | runtime | model as | accuracy in the runtime | bytes | batch 1 ms | batch 32 ms |",
             "|---|---|---|---|---|---|---|"]
    for model, res in blobs["runtimes"]["results"].items():
        for r in res["rows"]:
            if "accuracy" not in r or r["row"] in ("hpqdeploy quant", "hpqdeploy prune"):
                continue
            name = r["row"].removeprefix("hpqdeploy ") if r["tool"] == "hpqdeploy" else f"{r['row']} (its own tool)"
            lines.append(f"| {model} | {r['runtime']} | {name} | {100 * r['accuracy']:.2f}% | {r['bytes']:,} | "
                         f"{r['b1_p50_ms']:.3f} | {r['b32_p50_ms']:.2f} |")
    return "\n".join(lines)


def replace_block(text: str, name: str, block: str) -> str:
    """`text` with what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` replaced by `block`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block")
    head, _, rest = text.partition(begin)
    return f"{head}{begin}\n{block}\n{end}{rest.partition(end)[2]}"


def total_minutes(run: dict) -> int:
    return round(sum(r.get("seconds", 0) for r in run.get("sections", {}).values()) / 60)


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    keep = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def draw(blob: dict, path: Path) -> Path:
    """Accuracy in the runtime against batch-1 latency, a panel per model and runtime, the Pareto front marked."""
    from hpqdeploy.reporting.plots import Point, plot_tradeoff

    panels = []
    for model, res in blob["results"].items():
        by_runtime: dict[str, list[Point]] = {}
        for r in res["rows"]:
            if "accuracy" not in r or "b1_p50_ms" not in r:
                continue
            method = r["row"].removeprefix("hpqdeploy ") if r["tool"] == "hpqdeploy" else "peer"
            label = method if r["tool"] == "hpqdeploy" else r["row"]
            by_runtime.setdefault(r["runtime"], []).append(Point(r["b1_p50_ms"], r["accuracy"], label, r["runtime"],
                                                                 method))
        panels += [(f"{model} on {rt}", points) for rt, points in by_runtime.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_tradeoff(panels, path, "Accuracy against batch-1 latency, one thread", "batch-1 latency (ms)",
                         x_format="ms")


def run_section(s: Section, size: str, runs: Path, results: Path, log_dir: Path) -> dict:
    log = log_dir / f"{s.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(BENCH / f"{s.script}.py"), *s.args(size, runs, results)]
    start, load = time.time(), os.getloadavg()[0]
    with log.open("w") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **PINNED, "HPQDEPLOY_BENCH_RESULTS": str(results)}).returncode
    # the 1-minute load average when the section started and ended: on 2 cores, above 1 means something else ran
    return {"rc": rc, "seconds": round(time.time() - start), "load": [round(load, 2), round(os.getloadavg()[0], 2)],
            "log": str(log.relative_to(ROOT) if log.is_relative_to(ROOT) else log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced size (about 25 minutes on 2 cores)")
    ap.add_argument("--only", nargs="+", choices=tuple(BY_KEY), help="run these sections (render all found)")
    ap.add_argument("--runs", type=Path, help="run directories (default: bench/runs/full or bench/runs/quick)")
    ap.add_argument("--out", type=Path, help="results, BENCHMARKS.md and the picture (default: the repository's "
                                             "bench/results, BENCHMARKS.md and docs/img; --quick: bench/runs/quick)")
    ap.add_argument("--render-only", action="store_true", help="write BENCHMARKS.md from the results and stop")
    args = ap.parse_args()
    size = QUICK if args.quick else "full"
    runs = (args.runs or BENCH / "runs" / size).resolve()
    if args.out or args.quick:
        out = (args.out or BENCH / "runs" / "quick").resolve()
        results, page, picture, link = out / "results", out / "BENCHMARKS.md", out / PICTURE, PICTURE
    else:
        results, page = BENCH / "results", ROOT / "BENCHMARKS.md"
        picture, link = ROOT / "docs" / "img" / PICTURE, f"docs/img/{PICTURE}"
    if not args.render_only:
        results.mkdir(parents=True, exist_ok=True)
        state = {"command": " ".join(["python bench/run_all.py", *sys.argv[1:]]), "size": size, "sections": {}}
        if args.only and (results / "run_all.json").exists():  # a partial re-run keeps the other sections' record
            previous = json.loads((results / "run_all.json").read_text())
            state = {**previous, "continued": list(dict.fromkeys([*previous.get("continued", []), state["command"]]))}
        for s in [BY_KEY[k] for k in args.only] if args.only else SECTIONS:
            print(f"{s.key}: running {s.script}.py", flush=True)
            state["sections"][s.key] = outcome = run_section(s, size, runs, results, runs / "logs")
            (results / "run_all.json").write_text(json.dumps(state, indent=2) + "\n")
            print(f"{s.key}: {'done' if outcome['rc'] == 0 else 'FAILED, see ' + outcome['log']} "
                  f"({outcome['seconds']} s)", flush=True)
            if outcome["rc"]:
                return 1
    try:
        text = render(results, picture, link)
    except (MixedMachines, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    print(f"wrote {page} and {picture}")
    if page == ROOT / "BENCHMARKS.md" and (results / BY_KEY["runtimes"].results).exists():
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), "headline", headline(results)))
        print(f"wrote the headline table in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
