"""Accuracy and speed of `hpqdeploy export` in: every runtime, baseline and hybrid, side by side.

Exports the `compress_bench.py` artifacts (ResNet-20/CIFAR-10, MiniLM/SST-2) to each runtime with the CLI,
evaluates them in the runtime on the full evaluation split (done by `export`), then measures batch-1 latency of
all artifacts in one process, interleaved round-robin, every runtime pinned to one thread, repeated in separate
passes so the spread between passes is visible. For MiniLM it also compresses a hybrid with a 0.75 low-bit budget
(so linear layers mix 4- and 8-bit channels) and exports it both ways (`--mixed split` and `--mixed layer`), to
show the 4-bit weights in each artifact and measure which form is faster. Usage:

    .venv/bin/python bench/export_bench.py [--only resnet20|minilm] [--runs DIR] [--iters 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from common import cli, export, publish, replace_section, round_robin

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("onnxruntime", "openvino", "executorch", "tensorrt")
SOURCES = ("baseline", "hybrid")
# MiniLM hybrid whose linear layers mix 4- and 8-bit channels (the 0.5 default budget leaves them 8-bit)
B75 = ("hybrid-b75", ["--method", "hybrid", "--low-bit-share", "0.75", "--epochs", "1", "--lr", "5e-5",
                      "--train-limit", "12000"])


def latency(dirs: dict[str, Path], example, iters: int, repeats: int) -> dict[str, dict]:
    """Batch-1 latency, all sessions loaded in this process and timed round-robin (same machine state), in
    `repeats` separate passes: the figures are over all passes, `p50_ms_passes` each pass's median."""
    from hpqdeploy.lower.base import get_runtime

    sessions = {}
    for key, d in dirs.items():
        meta = json.loads((d / "export.json").read_text())
        sessions[key] = get_runtime(meta["runtime"]).load(d, threads=1)
    passes = {k: [[1e3 * t for t in run] for run in runs]
              for k, runs in round_robin(sessions, example, iters, repeats, warmup=20).items()}
    out = {}
    for k, runs in passes.items():
        v = [t for run in runs for t in run]
        out[k] = {"p50_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)),
                  "p99_ms": float(np.percentile(v, 99)), "mean_ms": statistics.fmean(v),
                  "p50_ms_passes": [round(statistics.median(run), 4) for run in runs], "iters": len(v)}
    return out


def _passes(r: dict) -> str:
    p = r.get("p50_ms_passes")
    return f"{min(p):.3f}–{max(p):.3f}" if p else "-"


def markdown(results: dict, commands: dict) -> str:
    lines = ["Exports with the CLI, evaluation inside each runtime on the full evaluation split, then batch-1 latency "
             "of every artifact of a model in one process, round-robin, 1 thread, in separate passes (p50 per pass "
             "shown as a range); the TensorRT row is its Q/DQ ONNX checked in ONNX Runtime: no GPU here. "
             "OpenVINO int8 layers carry 7-bit weights on this CPU (no VNNI; `--overflow-fix auto`).", ""]
    for model, rows in results.items():
        if model.endswith("/mixed"):
            continue
        if model in commands:
            lines += [f"Made by `{commands[model]}`.", ""]
        base = {r["artifact"].split("/")[1]: r for r in rows if r["artifact"].startswith("baseline/")}
        lines += [f"### {model}", "", "| artifact | accuracy in runtime | PyTorch | Δ (pt) | top-1 agreement | "
                  "bytes on disk | vs same runtime fp32 | p50 ms | p99 ms | p50 per pass | legalization changes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            rt = r["artifact"].split("/")[1]
            ratio = base[rt]["bytes_on_disk"] / r["bytes_on_disk"] if rt in base else float("nan")
            lines.append(f"| {r['artifact']} | {100 * r['accuracy']:.2f}% | {100 * r['accuracy_pytorch']:.2f}% | "
                         f"{r['accuracy_delta_points']:+.2f} | {100 * r['top1_agreement']:.2f}% | "
                         f"{r['bytes_on_disk']:,} | 1/{ratio:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{_passes(r)} | {r['legalization_changes']} |")
        lines.append("")
        mixed = results.get(f"{model}/mixed")
        if mixed:
            lines += _mixed_markdown(mixed)
    return "\n".join(lines)


def _mixed_markdown(rows: list[dict]) -> list[str]:
    lines = ["#### per-channel 4/8-bit layers: split vs layer level", "",
             f"`{B75[0]}` (linear layers mixing 4- and 8-bit channels) exported with `--mixed split` (one part per "
             "width, outputs re-ordered by a gather) and `--mixed layer` (each mixed layer raised to 8-bit). 4-bit "
             "weights are counted from the artifact itself.", "",
             "| runtime | mixed | accuracy in runtime | PyTorch (legalized) | agreement | bytes on disk | "
             "4-bit weights in the artifact | p50 ms | p50 per pass | layer/split p50 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    split = {r["runtime"]: r for r in rows if r["mixed"] == "split"}
    for r in rows:
        rel = r["p50_ms"] / split[r["runtime"]]["p50_ms"] if r["runtime"] in split else float("nan")
        lines.append(f"| {r['runtime']} | {r['mixed']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['accuracy_pytorch_legalized']:.2f}% | {100 * r['top1_agreement']:.2f}% | "
                     f"{r['bytes_on_disk']:,} | {r['four_bit']:,} | {r['p50_ms']:.3f} | {_passes(r)} | {rel:.2f} |")
    return [*lines, ""]


def four_bit_weights(contents: dict) -> int:
    """4-bit weight elements read back from the artifact (each runtime's inspect names them its own way)."""
    return sum(int(n) for key, n in (contents.get("weights") or {}).items()
               if re.match(r"(u?int4|[iu]4)\b", key, re.IGNORECASE) and isinstance(n, (int, float)))


def _row(key: str, d: Path, lat: dict) -> dict:
    meta = json.loads((d / "export.json").read_text())
    return {"artifact": key, "runtime": meta["runtime"], "mixed": meta["mixed"], "accuracy": meta["accuracy"],
            "accuracy_pytorch": meta["accuracy_pytorch"],
            "accuracy_pytorch_legalized": meta["accuracy_pytorch_legalized"],
            "accuracy_delta_points": meta["accuracy_delta_points"], "top1_agreement": meta["top1_agreement"],
            "max_abs_diff": meta["max_abs_diff"], "bytes_on_disk": meta["bytes_on_disk"],
            "legalization_changes": len(meta["legalization"]), "weights": meta["contents"].get("weights"),
            "four_bit": four_bit_weights(meta["contents"]), "notes": meta["notes"], "command": meta["command"],
            **lat[key]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("resnet20", "minilm"))
    ap.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs", help="where compress_bench.py wrote")
    ap.add_argument("--iters", type=int, default=200, help="timed iterations per artifact per pass")
    ap.add_argument("--repeats", type=int, default=3, help="latency passes")
    ap.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from bench/results/export.json")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / "export.json"
    heading = "export: accuracy inside each runtime"
    previous = json.loads(out.read_text()) if out.exists() else {"results": {}}
    previous.setdefault("commands", {})
    if args.render_only:
        replace_section("export", heading, markdown(previous["results"], previous["commands"]))
        return
    import torch

    from hpqdeploy.device.profile import example_batch

    torch.set_num_threads(1)
    models = [args.only] if args.only else ["resnet20", "minilm"]
    command = " ".join(["python bench/export_bench.py", *sys.argv[1:]])
    for model in models:
        dirs, mixed = {}, {}
        for source in SOURCES:
            for rt in RUNTIMES:
                dirs[f"{source}/{rt}"] = export(args.runs, model, source, rt)
        if model == "minilm":
            source, flags = B75
            if not (args.runs / model / source).exists():
                cli(["compress", str(args.runs / model / "baseline"), *flags, "-o", str(args.runs / model / source)],
                    args.runs / "logs" / f"{model}-{source}.log")
            for rt in RUNTIMES:
                for how in ("split", "layer"):
                    mixed[f"{source}/{rt}/{how}"] = export(args.runs, model, source, rt, how)
        dirs = {k: d for k, d in dirs.items() if (d / "export.json").exists()}
        mixed = {k: d for k, d in mixed.items() if (d / "export.json").exists()}
        example = example_batch({"source": str(args.runs / model / "baseline")}, 1, None)
        lat = latency({**dirs, **mixed}, example, args.iters, args.repeats)
        previous["results"][model] = [_row(k, d, lat) for k, d in dirs.items()]
        if mixed:
            previous["results"][f"{model}/mixed"] = [_row(k, d, lat) for k, d in mixed.items()]
        previous["commands"][model] = command
    publish(out, previous, "export", heading, markdown(previous["results"], previous["commands"]))


if __name__ == "__main__":
    main()
