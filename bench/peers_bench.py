"""Peer benchmark: hpqdeploy against the tools its users would otherwise pick, side by side.

For ResNet-20/CIFAR-10 and MiniLM/SST-2, on the runs `compress_bench.py` wrote (baseline = the fp32 model fine-tuned
with the methods' budget, the reference row; hybrid, prune-only, quant-only):
1. exports every hpqdeploy artifact to ONNX Runtime, OpenVINO and ExecuTorch with the CLI;
2. builds every peer (`bench/peers/`) in a process of its own: NNCF PTQ (OpenVINO), ORT quantize_static (ONNX
   Runtime), ExecuTorch's XNNPACK PT2E INT8, Torch-Pruning 30% + the same fine-tuning (fp32, all three runtimes),
   and for MiniLM NNCF compress_weights INT4/INT8 and ExecuTorch 8da4w;
3. in one process, every runtime pinned to one thread: evaluates every artifact in its runtime on the full
   evaluation split, reads its size on disk, and times batch-32 inference of all artifacts of a model round-robin in
   separate passes (throughput from each artifact's median batch time).
Writes bench/results/peers.json and the section in BENCHMARKS.md. Usage:

    .venv/bin/python bench/peers_bench.py [--only resnet20|minilm] [--resnet-runs DIR] [--minilm-runs DIR]
                                          [--iters 20] [--repeats 3] [--parallel 2] [--render-only]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import PINNED, ROOT, export, publish, replace_section, round_robin

RUNTIMES = ("onnxruntime", "openvino", "executorch")
SOURCES = ("baseline", "hybrid", "prune", "quant")
RESULTS = ROOT / "bench" / "results" / "peers.json"
HEADING = "peer benchmark"
GOALS = {"accuracy_points": 1.0, "smaller_than_fp32": 8.0, "throughput_vs_fp32": 1.5,
         "throughput_runtimes": ("openvino", "executorch")}


def peer_dir(runs: Path, model: str, peer: str, runtime: str) -> Path:
    return runs / "peers" / model / f"{peer}-{runtime}"


# ---------------------------------------------------------------- step 2: one peer, in a process of its own

def build_peer(model: str, name: str, runs: Path) -> None:
    import torch

    from peers import PEERS
    from peers.case import Case

    torch.set_num_threads(1)
    peer = PEERS.get(name)
    case = Case(model, runs)
    lock = runs / "peers" / model / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # one builder per peer and model; a second one waits, then finds it built
        _build_runtimes(peer, case, model, name, runs)


def _build_runtimes(peer, case, model: str, name: str, runs: Path) -> None:
    for runtime in peer.runtimes:
        out = peer_dir(runs, model, name, runtime)
        if (out / "peer.json").exists():
            continue
        work = out.with_name(out.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        start = time.time()
        notes = peer.build(case, runtime, work)
        meta = {"peer": name, "runtime": runtime, "model": model, "summary": peer.summary, "notes": notes,
                "build_seconds": round(time.time() - start, 1)}
        (work / "peer.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
        print(f"built {out}", flush=True)


def spawn_peer(model: str, name: str, runs: Path) -> int:
    log = runs / "logs" / f"peer-{model}-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        args = [sys.executable, str(Path(__file__).resolve()), "--build", name, "--model", model, "--runs", str(runs)]
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **PINNED},
                            cwd=ROOT / "bench").returncode
    if rc:
        print(f"peer {name} ({model}) failed: see {log}")
    return rc


# ---------------------------------------------------------------- step 3: evaluate and time, one process

def artifact_bytes(d: Path, runtime: str) -> int:
    """Bytes a deployment ships: the model files (ExecuTorch: one program; each batch size's program is a copy)."""
    if runtime == "executorch":
        return (d / "model_b1.pte").stat().st_size
    if runtime == "openvino":
        return sum((d / f).stat().st_size for f in ("model.xml", "model.bin"))
    return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))


def evaluate(session, case) -> float:
    import numpy as np

    from hpqdeploy.lower.export import _pad, to_numpy

    correct = total = 0
    for inputs, labels in case.eval_loader():
        n = labels.numel()
        logits = np.asarray(session(to_numpy(_pad(inputs, 32))))[:n]
        correct += int((logits.argmax(1) == labels.numpy()).sum())
        total += n
    return correct / total


def throughput(sessions: dict, batch, iters: int, repeats: int) -> dict[str, dict]:
    """Batch-32 calls of every session round-robin (same machine state for all), `repeats` separate passes."""
    passes = round_robin(sessions, batch, iters, repeats, warmup=3)
    out = {}
    for k, runs in passes.items():
        p50 = statistics.median([t for run in runs for t in run])
        out[k] = {"batch32_p50_ms": round(1e3 * p50, 3), "throughput_per_s": round(32 / p50, 1),
                  "throughput_per_pass": [round(32 / statistics.median(run), 1) for run in runs]}
    return out


def measure(model: str, runs: Path, iters: int, repeats: int) -> list[dict]:
    import torch

    from hpqdeploy.lower.base import get_runtime
    from hpqdeploy.lower.export import _pad, to_numpy
    from peers import all_peers
    from peers.case import Case

    torch.set_num_threads(1)
    case = Case(model, runs)
    rows, sessions = [], {}
    entries = [(f"hpqdeploy {s}", "hpqdeploy", s, rt, runs / "export" / model / f"{s}-{rt}")
               for s in SOURCES for rt in RUNTIMES]
    entries += [(f"{p.name}", p.name, None, rt, peer_dir(runs, model, p.name, rt))
                for p in all_peers() if model in p.models for rt in p.runtimes]
    for label, tool, source, rt, d in entries:
        meta_file = d / ("export.json" if tool == "hpqdeploy" else "peer.json")
        if not meta_file.exists():
            rows.append({"row": label, "tool": tool, "runtime": rt, "missing": f"{d} was not built (see its log)"})
            continue
        meta = json.loads(meta_file.read_text())
        try:
            session = get_runtime(rt).load(d, threads=1)
        except Exception as exc:  # a peer's artifact its own runtime cannot load is a result, not a crash
            rows.append({"row": label, "tool": tool, "runtime": rt,
                         "missing": f"built, but {rt} cannot load it: {str(exc).splitlines()[0][:160]}"})
            continue
        key = f"{label}/{rt}"
        sessions[key] = session
        rows.append({"row": label, "tool": tool, "runtime": rt, "key": key, "accuracy": evaluate(session, case),
                     "bytes": artifact_bytes(d, rt), "notes": meta.get("notes", []),
                     "summary": meta.get("summary", meta.get("command", "")),
                     "legalization_changes": len(meta.get("legalization", [])) if tool == "hpqdeploy" else None})
        print(f"{model} {key}: {100 * rows[-1]['accuracy']:.2f}%", flush=True)
    batch = to_numpy(_pad(next(iter(case.eval_loader()))[0], 32))
    timing = throughput(sessions, batch, iters, repeats)
    for r in rows:
        r.update(timing.get(r.get("key"), {}))
    return rows


# ---------------------------------------------------------------- goals and tables

def judge(rows: list[dict]) -> list[dict]:
    """The issue's goals for the hybrid, per runtime, each with its margin."""
    by = {(r["row"], r["runtime"]): r for r in rows if "accuracy" in r}
    goals = []
    for rt in RUNTIMES:
        hyb, base = by.get(("hpqdeploy hybrid", rt)), by.get(("hpqdeploy baseline", rt))
        if not hyb or not base:
            continue
        drop = 100 * (base["accuracy"] - hyb["accuracy"])
        goals.append({"runtime": rt, "goal": f"within {GOALS['accuracy_points']} point of the fp32 baseline",
                      "value": f"{-drop:+.2f} pt", "met": drop <= GOALS["accuracy_points"]})
        ratio = base["bytes"] / hyb["bytes"]
        goals.append({"runtime": rt, "goal": f"at least {GOALS['smaller_than_fp32']:.0f}x smaller than the fp32 "
                      "artifact", "value": f"{ratio:.1f}x", "met": ratio >= GOALS["smaller_than_fp32"]})
        rivals = [r for r in rows if r["tool"] != "hpqdeploy" and r["runtime"] == rt and "accuracy" in r
                  and r["accuracy"] >= hyb["accuracy"]]
        bigger = [r for r in rivals if r["bytes"] <= hyb["bytes"]]
        goals.append({"runtime": rt, "goal": "smaller than every peer artifact at equal or better accuracy",
                      "value": ("peers at >= its accuracy: " + ", ".join(
                          f"{r['row']} {r['bytes'] / hyb['bytes']:.2f}x its size" for r in rivals)) if rivals
                      else "no peer reaches its accuracy", "met": not bigger})
        if rt in GOALS["throughput_runtimes"] and "throughput_per_s" in hyb:
            speed = hyb["throughput_per_s"] / base["throughput_per_s"]
            goals.append({"runtime": rt, "goal": f"batch-32 throughput at least {GOALS['throughput_vs_fp32']}x the "
                          "fp32 baseline's", "value": f"{speed:.2f}x", "met": speed >= GOALS["throughput_vs_fp32"]})
    return goals


def markdown(blob: dict) -> str:
    lines = [f"Made by `{blob['command']}` ({blob['seconds']} s). Every row evaluated inside its runtime on the full "
             "evaluation split in this run; bytes are the model files a deployment ships (ExecuTorch: the batch-1 "
             "program; each batch size is its own copy); throughput from the median of batch-32 calls, all "
             f"artifacts of a model timed round-robin in {blob['repeats']} passes, 1 thread (per-pass range shown). "
             "Reference row: `hpqdeploy baseline` (the fp32 model fine-tuned with the methods' budget). Fine-tuning "
             "pipelines (hpqdeploy hybrid/prune/quant, tp-prune) share one budget: the hybrid run's own epochs, "
             "optimizer and distillation.", ""]
    for model, res in blob["results"].items():
        lines += [f"### {model}", "",
                  f"Compressed runs and exports under `{res['runs']}` (bench/compress_bench.py).", "",
                  "| tool / row | runtime | accuracy | Δ vs fp32 (pt) | bytes | vs fp32 | batch-32 img/s | per pass | "
                  "vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
        base = {r["runtime"]: r for r in res["rows"] if r["row"] == "hpqdeploy baseline" and "accuracy" in r}
        for rt in RUNTIMES:
            for r in (r for r in res["rows"] if r["runtime"] == rt):
                if "accuracy" not in r:
                    lines.append(f"| {r['row']} | {rt} | {r['missing']} | | | | | | |")
                    continue
                b = base.get(rt)
                if not b:
                    lines.append(f"| {r['row']} | {rt} | {100 * r['accuracy']:.2f}% | | {r['bytes']:,} | | | | |")
                    continue
                speed = f"{r['throughput_per_s'] / b['throughput_per_s']:.2f}x" if "throughput_per_s" in r else "-"
                passes = r.get("throughput_per_pass") or []
                span = f"{min(passes):.0f}–{max(passes):.0f}" if passes else "-"
                lines.append(f"| {r['row']} | {rt} | {100 * r['accuracy']:.2f}% | "
                             f"{100 * (r['accuracy'] - b['accuracy']):+.2f} | {r['bytes']:,} | "
                             f"1/{b['bytes'] / r['bytes']:.1f} | {r.get('throughput_per_s', '-')} | {span} | {speed} |")
        lines += ["", "Goals for the hybrid:", "", "| runtime | goal | measured | met |", "|---|---|---|---|"]
        lines += [f"| {g['runtime']} | {g['goal']} | {g['value']} | {'yes' if g['met'] else '**no**'} |"
                  for g in res["goals"]]
        lines += ["", "Peers as run:", ""]
        seen = set()
        for r in res["rows"]:
            if r["tool"] != "hpqdeploy" and r["tool"] not in seen and r.get("summary"):
                seen.add(r["tool"])
                deviations = [n.removeprefix("deviation: ") for n in r.get("notes", []) if n.startswith("deviation:")]
                lines.append(f"- `{r['tool']}`: {r['summary']}"
                             + "".join(f". **Deviation:** {d}" for d in deviations))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("resnet20", "minilm"))
    ap.add_argument("--resnet-runs", type=Path, default=ROOT / "bench" / "runs" / "e6b")
    ap.add_argument("--minilm-runs", type=Path, default=ROOT / "bench" / "runs" / "m31")
    ap.add_argument("--iters", type=int, default=20, help="timed batch-32 calls per artifact per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2, help="export/peer processes at a time (one thread each)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # internal: build one peer (a child process)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build_peer(args.model, args.build, args.runs)
        return
    blob = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"results": {}}
    if not args.render_only:
        from peers import all_peers

        start = time.time()
        runs = {"resnet20": args.resnet_runs.resolve(), "minilm": args.minilm_runs.resolve()}
        models = [args.only] if args.only else list(runs)
        with ThreadPoolExecutor(args.parallel) as pool:
            for f in [pool.submit(export, runs[m], m, "baseline", rt) for m in models for rt in RUNTIMES]:
                f.result()  # the PTQ peers start from the fp32 exports
            peers = sorted(all_peers(), key=lambda p: p.name != "tp-prune")  # the fine-tuning ones first
            jobs = [pool.submit(spawn_peer, m, p.name, runs[m]) for p in peers for m in models if m in p.models]
            jobs += [pool.submit(export, runs[m], m, s, rt) for m in models for s in SOURCES[1:] for rt in RUNTIMES]
            for f in jobs:
                f.result()
        command = " ".join(["python bench/peers_bench.py", *sys.argv[1:]])
        for m in models:
            rows = measure(m, runs[m], args.iters, args.repeats)
            blob["results"][m] = {"rows": rows, "goals": judge(rows), "runs": str(runs[m].relative_to(ROOT))}
        blob.update(command=command, seconds=round(time.time() - start), repeats=args.repeats, iters=args.iters)
        publish(RESULTS, blob, "peers", HEADING, markdown(blob))
    else:
        replace_section("peers", HEADING, markdown(blob))
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
