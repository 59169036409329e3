"""Acceptance benchmark for `hpqdeploy export` (issue 3): every runtime, baseline and hybrid, side by side.

Exports the `compress_bench.py` artifacts (ResNet-20/CIFAR-10, MiniLM/SST-2) to each runtime with the CLI,
evaluates them in the runtime on the full evaluation split (done by `export`), then measures batch-1 latency of
all artifacts in one process, interleaved round-robin, every runtime pinned to one thread. Usage:

    .venv/bin/python bench/export_bench.py [--only resnet20|minilm] [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "runs"
RUNTIMES = ("onnxruntime", "openvino", "executorch", "tensorrt")
SOURCES = ("baseline", "hybrid")


def export(model: str, source: str, runtime: str) -> Path:
    out = RUNS / "export" / model / f"{source}-{runtime}"
    if not (out / "export.json").exists():
        log = RUNS / "logs" / f"export-{model}-{source}-{runtime}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        args = ["export", str(RUNS / model / source), "--target", runtime, "-o", str(out), "--quiet"]
        with log.open("w") as fh:
            fh.write("$ hpqdeploy " + " ".join(args) + "\n")
            fh.flush()
            rc = subprocess.run([sys.executable, "-m", "hpqdeploy", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT).returncode
        if rc:
            print(f"export failed: {log}")
            return out
    return out


def latency(dirs: dict[str, Path], example, iters: int) -> dict[str, dict]:
    """Batch-1 latency, all sessions loaded in this process and timed round-robin (same machine state)."""
    from hpqdeploy.lower.base import get_runtime

    sessions = {}
    for key, d in dirs.items():
        meta = json.loads((d / "export.json").read_text())
        sessions[key] = get_runtime(meta["runtime"]).load(d, threads=1)
    times = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        for _ in range(20):
            s(example)
    for _ in range(iters):
        for k, s in sessions.items():
            t = time.perf_counter()
            s(example)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"p50_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)),
                "p99_ms": float(np.percentile(v, 99)), "mean_ms": statistics.fmean(v)} for k, v in times.items()}


def example_input(model: str):
    from hpqdeploy import artifact
    from hpqdeploy.export import fixed_collate, to_numpy
    from hpqdeploy.data import load_data
    from hpqdeploy.pipeline import DataOptions

    art = artifact.load(RUNS / model / "baseline")
    data = DataOptions(**art.plan["data"])
    data.eval_limit = 8
    splits = load_data(data.name, data.request(0))
    inputs, _ = fixed_collate(art.model)([splits.eval[0]])
    return to_numpy(inputs)


def markdown(results: dict) -> str:
    lines = ["Made by `python bench/export_bench.py` (exports with the CLI, evaluation inside each runtime on the full "
             "evaluation split, then batch-1 latency of every artifact in one process, round-robin, 1 thread; the "
             "TensorRT row is its Q/DQ ONNX checked in ONNX Runtime: no GPU here).", ""]
    for model, rows in results.items():
        base = {r["artifact"].split("/")[1]: r for r in rows if r["artifact"].startswith("baseline/")}
        lines += [f"### {model}", "", "| artifact | accuracy in runtime | PyTorch | Δ (pt) | top-1 agreement | "
                  "bytes on disk | vs same runtime fp32 | p50 ms | p99 ms | legalization changes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            rt = r["artifact"].split("/")[1]
            ratio = base[rt]["bytes_on_disk"] / r["bytes_on_disk"] if rt in base else float("nan")
            lines.append(f"| {r['artifact']} | {100 * r['accuracy']:.2f}% | {100 * r['accuracy_pytorch']:.2f}% | "
                         f"{r['accuracy_delta_points']:+.2f} | {100 * r['top1_agreement']:.2f}% | "
                         f"{r['bytes_on_disk']:,} | 1/{ratio:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{r['legalization_changes']} |")
        lines.append("")
    return "\n".join(lines)


def update_benchmarks_md(section: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    begin, end = "<!-- export:begin -->", "<!-- export:end -->"
    text = path.read_text()
    if begin not in text:
        text += f"\n## export (issue 3)\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{section}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("resnet20", "minilm"))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from bench/results/export.json")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / "export.json"
    if args.render_only:
        update_benchmarks_md(markdown(json.loads(out.read_text())["results"]))
        return
    import torch

    torch.set_num_threads(1)
    models = [args.only] if args.only else ["resnet20", "minilm"]
    results = {}
    for model in models:
        dirs = {}
        for source in SOURCES:
            for rt in RUNTIMES:
                d = export(model, source, rt)
                if (d / "export.json").exists():
                    dirs[f"{source}/{rt}"] = d
        lat = latency(dirs, example_input(model), args.iters)
        rows = []
        for key, d in dirs.items():
            meta = json.loads((d / "export.json").read_text())
            rows.append({"artifact": key, "accuracy": meta["accuracy"], "accuracy_pytorch": meta["accuracy_pytorch"],
                         "accuracy_delta_points": meta["accuracy_delta_points"],
                         "top1_agreement": meta["top1_agreement"], "max_abs_diff": meta["max_abs_diff"],
                         "bytes_on_disk": meta["bytes_on_disk"], "legalization_changes": len(meta["legalization"]),
                         "weights": meta["contents"].get("weights"), "notes": meta["notes"], **lat[key]})
        results[model] = rows
    previous = json.loads(out.read_text()) if out.exists() else {"results": {}}
    previous["results"].update(results)
    previous["command"] = "python bench/export_bench.py"
    out.write_text(json.dumps(previous, indent=2) + "\n")
    update_benchmarks_md(markdown(previous["results"]))
    print(f"wrote {out} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
