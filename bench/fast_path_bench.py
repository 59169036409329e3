"""Is the compressed model faster on each runtime than what the runtime's own INT8 tool makes in a minute?

For ResNet-20/CIFAR-10 and MiniLM/SST-2: the runs under `--runs DIR` (DIR/MODEL/{baseline,quant,prune,hybrid}, made by
`hpqdeploy train` and `hpqdeploy compress`) are exported with the CLI to ONNX Runtime, OpenVINO and ExecuTorch; each
runtime's own post-training tool quantizes the same fp32 baseline in this run (`bench/peers/`: ResNet-20 ORT
`quantize_static`, NNCF `quantize`, ExecuTorch PT2E `XNNPACKQuantizer`; MiniLM ORT `quantize_dynamic`, NNCF
`quantize`, ExecuTorch 8da4w). Then, in one process, every runtime on one thread: each artifact is evaluated inside
its runtime on the full evaluation split, and all artifacts of a model are timed round-robin at batch 1 and batch 32
in separate passes. Each export's own read-back (which layers run in integer kernels) is copied into the results.
Writes bench/results/fast_path.json and its section of BENCHMARKS.md, headed by the machine it ran on. Usage:

    .venv/bin/python bench/fast_path_bench.py --runs DIR [--only resnet20|minilm] [--iters-b1 200]
                                               [--iters-b32 30] [--repeats 3] [--parallel 2] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, export, machine, machine_markdown, publish, replace_section, results_dir, round_robin
from peers_bench import artifact_bytes, evaluate, peer_dir, spawn_peer

RUNTIMES = ("onnxruntime", "openvino", "executorch")
SOURCES = ("baseline", "quant", "prune", "hybrid")
PEERS = {"resnet20": {"onnxruntime": "ort-static", "openvino": "nncf-ptq", "executorch": "et-pt2e"},
         "minilm": {"onnxruntime": "ort-dynamic", "openvino": "nncf-ptq", "executorch": "et-8da4w"}}
GOALS = {  # speed of hpqdeploy's artifact over the best peer's on the same runtime, per batch size
    "resnet20": {"quant": {1: 1.0, 32: 1.0}, "hybrid": {1: 1.3, 32: 1.6}},
    "minilm": {"quant": {1: 1.0, 32: 1.0}, "hybrid": {1: 1.3, 32: 1.3}}}
ACCURACY_GOALS = {"quant": 0.2, "hybrid": 0.3}  # points between the runtime and the PyTorch compressed model
RESULTS = results_dir() / "fast_path.json"
HEADING = "speed against each runtime's own INT8 tool"
BATCHES = (1, 32)


def measure(model: str, runs: Path, iters: dict[int, int], repeats: int) -> list[dict]:
    import torch

    from hpqdeploy.lower.base import get_runtime
    from hpqdeploy.lower.export import _pad, to_numpy
    from peers.case import Case

    torch.set_num_threads(1)
    case = Case(model, runs)
    rows, sessions = [], {}
    for rt in RUNTIMES:
        entries = [(f"hpqdeploy {s}", "hpqdeploy", runs / "export" / model / f"{s}-{rt}") for s in SOURCES]
        entries.append((PEERS[model][rt], PEERS[model][rt], peer_dir(runs, model, PEERS[model][rt], rt)))
        for label, tool, d in entries:
            meta_file = d / ("export.json" if tool == "hpqdeploy" else "peer.json")
            if not meta_file.exists():
                rows.append({"row": label, "runtime": rt, "missing": f"{d} was not built (see its log)"})
                continue
            meta = json.loads(meta_file.read_text())
            try:
                session = get_runtime(rt).load(d, threads=1)
            except Exception as exc:  # a peer's artifact its runtime cannot load is a result
                rows.append({"row": label, "runtime": rt, "missing": f"{rt} cannot load it: {str(exc)[:160]}"})
                continue
            key = f"{label}/{rt}"
            sessions[key] = session
            row = {"row": label, "tool": tool, "runtime": rt, "key": key, "accuracy": evaluate(session, case),
                   "bytes": artifact_bytes(d, rt), "notes": meta.get("notes", [])}
            if tool == "hpqdeploy":
                row["accuracy_pytorch"] = meta.get("accuracy_pytorch")
                row["accuracy_pytorch_legalized"] = meta.get("accuracy_pytorch_legalized")
                row["legalization_changes"] = len(meta.get("legalization", []))
                row["fast_path"] = meta.get("contents", {}).get("fast_path")
            else:
                row["summary"] = meta.get("summary", "")
            rows.append(row)
            print(f"{model} {key}: {100 * row['accuracy']:.2f}%", flush=True)
    first = next(iter(case.eval_loader()))[0]
    for batch in BATCHES:
        rows_ = {k: v[:batch] for k, v in first.items()} if isinstance(first, dict) else first[:batch]
        inputs = to_numpy(_pad(rows_, batch))
        if batch == 32 and model == "resnet20":  # where the time goes, in ORT's own profile
            for r in rows:
                if r.get("runtime") == "onnxruntime" and "key" in r:
                    d = runs / "export" / model / f"{r['row'].split()[-1]}-onnxruntime" if r["tool"] == "hpqdeploy" \
                        else peer_dir(runs, model, r["tool"], "onnxruntime")
                    r["ort_profile_b32_ms"] = ort_time_by_resolution(d / "model.onnx", inputs)
        passes = round_robin(sessions, inputs, iters[batch], repeats, warmup=5, shuffle=True)
        for r in rows:
            if r.get("key") in passes:
                runs_ = passes[r["key"]]
                p50 = statistics.median(t for run in runs_ for t in run)
                r[f"b{batch}_p50_ms"] = round(1e3 * p50, 4)
                r[f"b{batch}_per_s"] = round(batch / p50, 1)
                r[f"b{batch}_per_pass_ms"] = [round(1e3 * statistics.median(run), 4) for run in runs_]
    return rows


def ort_time_by_resolution(model_path: Path, inputs, calls: int = 10) -> dict[str, float]:
    """ONNX Runtime's own profiler, one thread: ms per call spent in its integer and float convolution / matmul
    kernels, by output spatial size (a CNN's stages), and in everything else. Says where a pruned model's time went."""
    import onnxruntime as ort

    from hpqdeploy.lower.onnxruntime_rt import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(1)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        feeds = inputs if isinstance(inputs, dict) else {session.get_inputs()[0].name: inputs}
        for _ in range(calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    out: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        args = e["args"]
        key = "other ops"
        if args.get("op_name") in ("QLinearConv", "Conv", "FusedConv", "NchwcConv"):
            shape = list(args["output_type_shape"][0].values())[0]
            nhwc = args["op_name"] == "QLinearConv" and len(shape) == 4  # ORT runs int8 convs channels-last
            h, w = (shape[1], shape[2]) if nhwc else (shape[-2], shape[-1])
            key = f"conv {h}x{w}"
        out[key] = out.get(key, 0.0) + e["dur"] / 1e3 / calls
    return {k: round(v, 3) for k, v in sorted(out.items())}


def judge(model: str, rows: list[dict]) -> list[dict]:
    by = {(r["row"], r["runtime"]): r for r in rows if "accuracy" in r}
    goals = []
    for rt in RUNTIMES:
        peer = by.get((PEERS[model][rt], rt))
        for source in ("quant", "hybrid"):
            r = by.get((f"hpqdeploy {source}", rt))
            if r is None:
                continue
            if r.get("accuracy_pytorch") is not None:
                gap = 100 * abs(r["accuracy"] - r["accuracy_pytorch"])
                goals.append({"runtime": rt, "source": source, "goal": f"accuracy in the runtime within "
                              f"{ACCURACY_GOALS[source]} point of PyTorch's", "value": f"{gap:.2f} pt",
                              "met": gap <= ACCURACY_GOALS[source] + 1e-9})
            for batch, factor in GOALS[model][source].items():
                if peer is None or f"b{batch}_p50_ms" not in r or f"b{batch}_p50_ms" not in peer:
                    goals.append({"runtime": rt, "source": source, "goal": f"batch {batch}: at least {factor}x the "
                                  "peer's throughput", "value": "no peer row", "met": False})
                    continue
                speed = peer[f"b{batch}_p50_ms"] / r[f"b{batch}_p50_ms"]
                goals.append({"runtime": rt, "source": source, "goal": f"batch {batch}: at least {factor}x "
                              f"{peer['row']}'s throughput", "value": f"{speed:.2f}x", "met": speed >= factor})
    return goals


def _fast_path_text(r: dict) -> str:
    fp = r.get("fast_path") or {}
    if not fp:
        return ""
    text = f"{fp.get('integer', 0)}/{fp.get('quantized', 0)} int"
    return text + (f"; float: {', '.join(fp['float'])}" if fp.get("float") else "")


def markdown(blob: dict) -> str:
    lines = [machine_markdown(blob["machine"]), "",
             f"Made by `{blob['command']}` ({blob['seconds']} s). Every row evaluated inside its runtime on the "
             "full evaluation split; bytes are the model files a deployment ships (ExecuTorch: the batch-1 program). "
             "Latency: median of all calls at batch 1 and batch 32, every artifact of a model timed round-robin (in a "
             f"new seeded order each round, so none always follows the same one) in {blob['repeats']} passes "
             f"({blob['iters']['1']} / {blob['iters']['32']} calls per pass), one thread "
             "per runtime; per-pass medians in the JSON. The peers quantize the same fp32 baseline in the same run "
             "and calibrate on the same examples as the plan. `int layers`: the export's read-back of the layers "
             "the runtime runs in integer kernels (of those the plan quantized). `PyTorch`: the compressed model as "
             "compress wrote it; `PyTorch legalized`: the same after export raised or regrouped what the runtime "
             "does not execute (the runtime computes this one).", ""]
    for model, res in blob["results"].items():
        lines += [f"### {model}", "", f"Runs: `{res['runs']}` ({res['budget']}).", "",
                  "| row | runtime | accuracy | PyTorch | PyTorch legalized | bytes | b1 ms | b32 ms | b1 vs peer | "
                  "b32 vs peer | int layers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        peers = {r["runtime"]: r for r in res["rows"] if r["row"] == PEERS[model].get(r["runtime"])}
        for r in res["rows"]:
            if "accuracy" not in r:
                lines.append(f"| {r['row']} | {r['runtime']} | {r['missing']} | | | | | | | | |")
                continue
            p = peers.get(r["runtime"], {})
            vs = [f"{p[f'b{b}_p50_ms'] / r[f'b{b}_p50_ms']:.2f}x" if f"b{b}_p50_ms" in p and f"b{b}_p50_ms" in r
                  else "" for b in BATCHES]
            torch_acc, legal_acc = (f"{100 * r[k]:.2f}%" if r.get(k) is not None else ""
                                    for k in ("accuracy_pytorch", "accuracy_pytorch_legalized"))
            if r.get("legalization_changes"):
                legal_acc += f" ({r['legalization_changes']} changes)"
            lines.append(f"| {r['row']} | {r['runtime']} | {100 * r['accuracy']:.2f}% | {torch_acc} | {legal_acc} | "
                         f"{r['bytes']:,} | {r.get('b1_p50_ms', '')} | {r.get('b32_p50_ms', '')} | {vs[0]} | {vs[1]} | "
                         f"{_fast_path_text(r)} |")
        profiled = [r for r in res["rows"] if r.get("ort_profile_b32_ms")]
        if profiled:
            keys = sorted({k for r in profiled for k in r["ort_profile_b32_ms"]})
            lines += ["", "Where ONNX Runtime spends a batch of 32 (its own profiler, ms per call, one thread):", "",
                      "| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            lines += [f"| {r['row']} | " + " | ".join(f"{r['ort_profile_b32_ms'].get(k, 0):.2f}" for k in keys) + " |"
                      for r in profiled]
        lines += ["", "Peers as run:", ""]
        seen = set()
        for r in res["rows"]:
            if r.get("tool") not in (None, "hpqdeploy") and r["tool"] not in seen:
                seen.add(r["tool"])
                lines.append(f"- `{r['tool']}`: {r.get('summary', '')}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, required=True, help="holds MODEL/{baseline,quant,prune,hybrid}")
    ap.add_argument("--only", choices=tuple(PEERS))
    ap.add_argument("--budget", default="", help="how the runs were made (recorded with the table)")
    ap.add_argument("--iters-b1", type=int, default=200)
    ap.add_argument("--iters-b32", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2, help="export/peer processes at a time (one thread each)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)  # run_all's tests
    args = ap.parse_args()
    if args.parse_only:
        return
    blob = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"results": {}}
    if args.render_only:
        replace_section("fast_path", HEADING, markdown(blob))
        return
    start = time.time()
    runs = args.runs.resolve()
    models = [args.only] if args.only else [m for m in PEERS if (runs / m / "baseline").is_dir()]
    with ThreadPoolExecutor(args.parallel) as pool:
        for f in [pool.submit(export, runs, m, "baseline", rt) for m in models for rt in RUNTIMES]:
            f.result()  # the peers start from the fp32 exports
        jobs = [pool.submit(spawn_peer, m, p, runs) for m in models for p in sorted(set(PEERS[m].values()))]
        jobs += [pool.submit(export, runs, m, s, rt) for m in models for s in SOURCES[1:] for rt in RUNTIMES]
        for f in jobs:
            f.result()
    iters = {1: args.iters_b1, 32: args.iters_b32}
    for m in models:
        rows = measure(m, runs, iters, args.repeats)
        try:
            where = str(runs.relative_to(ROOT))
        except ValueError:
            where = str(runs)
        blob["results"][m] = {"rows": rows, "goals": judge(m, rows), "runs": where, "budget": args.budget}
    blob.update(command=" ".join(["python bench/fast_path_bench.py", *sys.argv[1:]]),
                seconds=round(time.time() - start), repeats=args.repeats, iters={"1": iters[1], "32": iters[32]},
                machine=machine())
    publish(RESULTS, blob, "fast_path", HEADING, markdown(blob))


if __name__ == "__main__":
    main()
