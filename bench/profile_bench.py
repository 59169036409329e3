"""`hpqdeploy profile` on this machine: latency percentiles, throughput, memory, energy where a meter exists.

Profiles the baseline and hybrid exports of ResNet-20/CIFAR-10 and MiniLM/SST-2 (written by `export_bench.py`) for
ONNX Runtime, OpenVINO and ExecuTorch, at batch 1 and a larger batch, one CLI process per profile, one after the
other, every runtime pinned to one thread, three repeats each; every repeat warms up for `--warmup-seconds` and
times at least `--min-seconds` (a 0.2 ms call needs both: a repeat of 300 calls is 60 ms). Writes
bench/results/profile.json and the table in BENCHMARKS.md. Usage:

    .venv/bin/python bench/profile_bench.py [--only resnet20|minilm] [--runs DIR] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import machine, publish, results_dir, run_cli

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("onnxruntime", "openvino", "executorch")
SOURCES = ("baseline", "hybrid")
# per model: (batch, timed calls per repeat) pairs; the larger batch gets fewer calls so a repeat stays short
PLAN = {"resnet20": [(1, 300), (32, 40)], "minilm": [(1, 60), (32, 8)]}
REPEATS = 3


def profile(runs: Path, model: str, source: str, runtime: str, batch: int, iters: int, warmup_seconds: float,
            min_seconds: float) -> dict | None:
    """One `hpqdeploy profile` of an export under `runs` (kept there, so a re-run reuses it)."""
    export_dir = runs / "export" / model / f"{source}-{runtime}"
    out = runs / "profile" / model / f"{source}-{runtime}-b{batch}"
    if not (out / "profile.json").exists():
        if not (export_dir / "export.json").exists():
            print(f"missing export {export_dir}: run bench/export_bench.py first")
            return None
        args = ["profile", str(export_dir), "-o", str(out), "--device", "x86", "--batch-size", str(batch),
                "--iters", str(iters), "--repeats", str(REPEATS), "--threads", "1", "--warmup", "10",
                "--warmup-seconds", str(warmup_seconds), "--min-seconds", str(min_seconds)]
        log = runs / "logs" / f"profile-{model}-{source}-{runtime}-b{batch}.log"
        if run_cli(args, log, quiet=False):
            print(f"profile failed: {log}")
            return None
    result = json.loads((out / "profile.json").read_text())
    result.pop("repeats")  # raw per-call times stay in the run directory's profile.json
    return result


def row(model: str, source: str, runtime: str, r: dict) -> dict:
    lat, energy, mem = r["latency"], r["energy"], r["memory"]
    return {"model": model, "artifact": f"{source}/{runtime}", "batch": r["settings"]["batch"],
            "calls": lat["calls"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "mean_ms": lat["mean_ms"],
            "throughput_per_s": lat["throughput_per_s"], "p50_ms_per_repeat": lat["p50_ms_per_repeat"],
            "p50_spread": lat["p50_spread"], "peak_rss_bytes": mem.get("peak_rss_bytes"),
            "energy_per_inference_j": energy["energy_per_inference_j"], "energy_reason": energy["reason"],
            "idle_power_w": energy["idle"].get("mean_power_w"), "command": r["command"],
            "throttle": [r["state"]["throttle_count_before"], r["state"]["throttle_count_after"]],
            "governor": r["state"]["before"].get("files", {}).get("governor")}


def markdown(blob: dict) -> str:
    each = (f"each after 10 warm-up calls and at least {blob['warmup_seconds']:g} s of warm-up, timing the stated "
            f"calls and at least {blob['min_seconds']:g} s" if "warmup_seconds" in blob else
            "each timing the stated calls after 10 warm-up calls")
    lines = [f"Made by `{blob['command']}`: one `hpqdeploy profile --device x86` process per row, run one after the "
             f"other, 1 thread, {REPEATS} repeats, {each}; p50 spread = (max - min) / median of the three repeats' "
             "p50. Peak RSS is the whole profiling process (Python, torch and the "
             "runtime included: the CLI loads the source artifact for example inputs), read from VmHWM after a reset "
             "at load, so compare it between rows, not with a device's free memory.", ""]
    reasons = {r["energy_reason"] for rows in blob["results"].values() for r in rows if r["energy_reason"]}
    for model, rows in blob["results"].items():
        lines += [f"### {model}", "", "| artifact | batch | calls | p50 ms | p99 ms | inferences/s | p50 per repeat "
                  "| p50 spread | hybrid speed-up (p50) | peak RSS MB | J/inference |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {(r["artifact"].split("/")[1], r["batch"]): r for r in rows if r["artifact"].startswith("baseline/")}
        for r in rows:
            b = base.get((r["artifact"].split("/")[1], r["batch"]))
            speed = f"{b['p50_ms'] / r['p50_ms']:.2f}x" if b and r["artifact"].startswith("hybrid/") else ""
            per = ", ".join(f"{v:.3f}" for v in r["p50_ms_per_repeat"])
            rss = "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f}"
            joules = "n/a" if r["energy_per_inference_j"] is None else f"{r['energy_per_inference_j']:.4g}"
            lines.append(f"| {r['artifact']} | {r['batch']} | {r['calls']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{r['throughput_per_s']:.1f} | {per} | {100 * r['p50_spread']:.1f}% | {speed} | {rss} | "
                         f"{joules} |")
        lines.append("")
    if reasons:
        lines.append("Energy: " + "; ".join(sorted(reasons)) + ". No energy figure is reported.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(PLAN))
    ap.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs", help="where export_bench.py wrote")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--iters-factor", type=float, default=1.0, help="scale every row's timed calls (a smaller run)")
    ap.add_argument("--warmup-seconds", type=float, default=1.0, help="warm-up of every repeat, at least")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed part of every repeat, at least")
    ap.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)  # run_all's tests
    args = ap.parse_args()
    if args.parse_only:
        return
    out = results_dir() / "profile.json"
    blob = json.loads(out.read_text()) if out.exists() else {"results": {}, "commands": {}}
    if not args.render_only:
        for model in [args.only] if args.only else list(PLAN):
            rows = []
            for batch, iters in PLAN[model]:
                for source in SOURCES:
                    for rt in RUNTIMES:
                        n = max(2, round(iters * args.iters_factor))
                        r = profile(args.runs.resolve(), model, source, rt, batch, n, args.warmup_seconds,
                                    args.min_seconds)
                        if r is not None:
                            rows.append(row(model, source, rt, r))
            blob["results"][model] = rows
            blob["commands"][model] = " ".join(["python bench/profile_bench.py", *sys.argv[1:]])
        blob["machine"] = machine()
        blob["warmup_seconds"], blob["min_seconds"] = args.warmup_seconds, args.min_seconds
    blob["command"] = "; ".join(dict.fromkeys(blob["commands"].values()))
    publish(out, blob, "profile", "profile on this CPU", markdown(blob))


if __name__ == "__main__":
    main()
