"""ONNX Runtime's 8-bit weights: int8 (u8 x s8 kernels) against uint8 with zero point 128 (u8 x u8), side by side.

`hpqdeploy export --target onnxruntime` stores int8 weights where the CPU has VNNI and uint8 ones where it does not
(`--overflow-fix auto`): without VNNI, ORT's u8 x s8 kernels add pairs of products in saturating int16. This
script exports one compress artifact both ways (`--overflow-fix off` and `on`), reads each export's evaluation
inside ONNX Runtime, and times the two in one process, round-robin, one thread, at batch 1 and 32, in separate
passes.

    python bench/ort_encoding_bench.py ARTIFACT_DIR [--runs DIR] [--iters 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from common import ROOT, cli, publish, round_robin
from denormal_bench import cpu_name

RESULTS = ROOT / "bench" / "results" / "ort_encoding.json"
FORMS = {"int8 weights, u8 x s8 (--overflow-fix off)": "off", "uint8 weights, u8 x u8 (--overflow-fix on)": "on"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs" / "ort-encoding")
    ap.add_argument("--iters", type=int, default=300, help="timed calls per form per pass at batch 1")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    from hpqdeploy.device.profile import example_batch
    from hpqdeploy.lower.base import get_runtime
    from hpqdeploy.lower.cpu import has_vnni

    torch.set_num_threads(1)
    dirs = {}
    for form, fix in FORMS.items():
        out = args.runs / f"{args.artifact.name}-{fix}"
        if not (out / "export.json").exists() and not cli(
                ["export", str(args.artifact), "--target", "onnxruntime", "--overflow-fix", fix, "-o", str(out)],
                args.runs / f"export-{fix}.log"):
            raise SystemExit(f"export failed: see {args.runs / f'export-{fix}.log'}")
        dirs[form] = out
    exports = {form: json.loads((d / "export.json").read_text()) for form, d in dirs.items()}
    sessions = {form: get_runtime("onnxruntime").load(d, threads=1) for form, d in dirs.items()}
    latency = {}
    for batch, iters in ((1, args.iters), (32, max(1, args.iters // 10))):
        example = example_batch({"source": str(args.artifact)}, batch, None)
        passes = round_robin(sessions, example, iters, args.repeats, warmup=20)
        latency[batch] = {form: [1e3 * statistics.median(run) for run in runs] for form, runs in passes.items()}
    command = "python " + shlex.join(sys.argv)
    blob = {"command": command, "artifact": str(args.artifact), "cpu": cpu_name(), "vnni": has_vnni(),
            "repeats": args.repeats, "iters_batch1": args.iters,
            "forms": {form: {"accuracy": exports[form]["accuracy"], "top1_agreement": exports[form]["top1_agreement"],
                             "max_abs_diff": exports[form]["max_abs_diff"],
                             "eval_examples": exports[form]["eval_examples"],
                             "p50_ms_passes": {b: latency[b][form] for b in latency}} for form in FORMS}}
    first, second = FORMS
    rows = []
    for form in FORMS:
        e = exports[form]
        cells = []
        for b in latency:
            med = statistics.median(latency[b][form])
            ratio = statistics.median(latency[b][second]) / statistics.median(latency[b][first])
            cells.append(f"{med:.3f} ({min(latency[b][form]):.3f}–{max(latency[b][form]):.3f})"
                         + (f", {ratio:.2f}x faster" if form == first else ""))
        rows.append(f"| {form} | {100 * e['accuracy']:.2f}% | {100 * e['top1_agreement']:.2f}% | "
                    f"{e['max_abs_diff']:.4f} | {' | '.join(cells)} |")
    section = "\n".join([
        f"Made by `{command}`: the artifact exported both ways, each evaluated inside ONNX Runtime on "
        f"{exports[first]['eval_examples']:,} examples by `export`; then both timed in one process, round-robin, "
        f"one thread, {args.repeats} passes ({args.iters} calls per pass at batch 1, {max(1, args.iters // 10)} at "
        "batch 32); p50 of the passes' medians, range over passes.", "",
        "| weights | accuracy in ORT | top-1 agreement with PyTorch | max abs logit diff | p50 ms, batch 1 | "
        "p50 ms, batch 32 |", "|---|---|---|---|---|---|", *rows, "",
        f"CPU: {blob['cpu']}, VNNI: {'yes' if blob['vnni'] else 'no' if blob['vnni'] is False else 'unknown'}. "
        "Where the CPU has VNNI both forms compute the same integers; `--overflow-fix auto` picks int8 there and "
        "uint8 on x86 CPUs without it, where the u8 x s8 kernels would saturate.",
    ])
    publish(RESULTS, blob, "ort-encoding", "ONNX Runtime weight encoding", section)


if __name__ == "__main__":
    main()
