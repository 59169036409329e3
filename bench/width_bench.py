"""Which channel widths are fast, per runtime, on this machine: the measurement behind `channel_multiple`.

Pruning may leave a layer any width that is a multiple of the target's `channel_multiple`. Whether a width of 24 or 40
runs as fast per MAC as 32 or 48 depends on the runtime's kernels and the CPU's ISA (fp32 AVX2/AVX-512 blocks of 8 or
16; int8 VNNI/AMX blocks of 16 to 64). For each runtime (ONNX Runtime, OpenVINO, ExecuTorch XNNPACK), in fp32 and in
int8 made by the runtime's own quantizer (ORT `quantize_static` QDQ, NNCF `quantize`, XNNPACK PT2E), this times:

- conv: two 3x3 convolutions w -> w at 16x16 (a CIFAR ResNet's middle stage), w = 8, 16, ..., 64;
- linear: 64 tokens through 384 -> n (a small transformer's FFN), n = 1024, 1032, ..., 1088;

at batch 1 and 32, every variant of one runtime and layer kind timed round-robin, one thread. Then, for each
candidate multiple m (8, 16, 32, 64 for linear), widths that are multiples of m are "fast" when none of them is slower
than a larger one of them (within the tolerance): the smallest such m is the runtime's multiple on this ISA. Writes
bench/results/width.json and its section of BENCHMARKS.md; `targets/<runtime>.toml` records the multiples found per
ISA family under `[channel_multiple_by_isa]`. Usage:

    .venv/bin/python bench/width_bench.py [--iters 40] [--repeats 3] [--tolerance 0.03] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import ROOT, machine, machine_markdown, publish, replace_section, results_dir, round_robin

RESULTS = results_dir() / "width.json"
HEADING = "channel widths the runtimes run fast"
RUNTIMES = ("onnxruntime", "openvino", "executorch")
CONV_WIDTHS = tuple(range(8, 65, 8))
LINEAR_WIDTHS = tuple(range(1024, 1089, 8))
CANDIDATES = {"conv": (8, 16, 32), "linear": (8, 16, 32, 64)}
BATCHES = (1, 32)


class ConvPair(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def micro(kind: str, w: int) -> tuple[nn.Module, torch.Tensor, int]:
    """The model, an example of batch 1, and its MACs per example."""
    torch.manual_seed(0)
    if kind == "conv":
        return ConvPair(w).eval(), torch.randn(1, w, 16, 16), 2 * w * w * 9 * 16 * 16
    return nn.Linear(384, w).eval(), torch.randn(1, 64, 384), 64 * 384 * w


def calibration(example: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, *example.shape[1:], generator=g).abs() for _ in range(4)]


def build(runtime: str, precision: str, model: nn.Module, example: torch.Tensor, out: Path):
    """A session (a callable on numpy arrays) of `model` in `runtime`, fp32 or int8 by the runtime's own tool."""
    calib = calibration(example)
    if runtime == "onnxruntime":
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        path = out / "model.onnx"
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
        if precision == "int8":
            feeds = iter([{"x": c.numpy()} for c in calib])

            class Reader(CalibrationDataReader):
                def get_next(self):
                    return next(feeds, None)

            quantize_static(str(path), str(out / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            path = out / "q.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})[0]
    if runtime == "openvino":
        import openvino as ov

        ov_model = ov.convert_model(model, example_input=example)
        if precision == "int8":
            import nncf

            ov_model = nncf.quantize(ov_model, nncf.Dataset([c.numpy() for c in calib]), subset_size=len(calib))
        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": 1,
                                                             "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        return lambda x: request.infer([x])[0]
    from hpqdeploy.lower.base import get_runtime
    from hpqdeploy.lower.executorch_rt import write_programs

    if precision == "int8":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        graph = torch.export.export(model, (calib[0],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for c in calib:
                prepared(c)
        model = convert_pt2e(prepared)
    write_programs(model, example, BATCHES, out)
    session = get_runtime("executorch").load(out, threads=1)
    return session


def fast_multiple(passes: dict[int, list[float]], candidates: tuple[int, ...], tolerance: float
                  ) -> tuple[int | None, list]:
    """The smallest candidate m whose widths (multiples of m) never take longer than a larger one of them, in every
    pass (`passes`: per width, the median seconds of each pass); and, for each smaller candidate, its slow widths."""
    losers = []
    times = {w: statistics.median(p) for w, p in passes.items()}
    for m in candidates:
        widths = sorted(w for w in passes if w % m == 0)
        slow = [(w, v) for i, w in enumerate(widths) for v in widths[i + 1:]
                if all(a > b * (1 + tolerance) for a, b in zip(passes[w], passes[v]))]
        if not slow:
            return m, losers
        losers.append({"multiple": m, "slow": [{"width": w, "slower_than": v,
                                                "ratio": round(times[w] / times[v], 3)} for w, v in slow]})
    return None, losers


def measure(runtime: str, kind: str, iters: int, repeats: int, tolerance: float) -> dict:
    widths = CONV_WIDTHS if kind == "conv" else LINEAR_WIDTHS
    result = {"runtime": runtime, "kind": kind, "widths": list(widths), "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            sessions, macs, examples = {}, {}, {}
            for w in widths:
                model, example, macs[w] = micro(kind, w)
                d = Path(tmp) / f"{precision}-{w}"
                d.mkdir()
                sessions[w] = build(runtime, precision, model, example, d)
                examples[w] = example
            for batch in BATCHES:
                inputs = {w: np.ascontiguousarray(examples[w].repeat(batch, *[1] * (examples[w].dim() - 1)).numpy())
                          for w in widths}
                calls = {w: (lambda s=sessions[w], x=inputs[w]: s(x)) for w in widths}
                passes = round_robin({w: (lambda _x, c=c: c()) for w, c in calls.items()}, None, iters, repeats,
                                     warmup=3)
                times = {w: statistics.median(t for run in runs for t in run) for w, runs in passes.items()}
                per_mac = {w: times[w] / (macs[w] * batch) for w in widths}
                per_pass = {w: [statistics.median(run) for run in runs] for w, runs in passes.items()}
                multiple, losers = fast_multiple(per_pass, CANDIDATES[kind], tolerance)
                result["batches"].setdefault(str(batch), {})[precision] = {
                    "p50_ms": {str(w): round(1e3 * t, 4) for w, t in times.items()},
                    "ps_per_mac": {str(w): round(1e12 * v, 2) for w, v in per_mac.items()},
                    "fast_multiple": multiple, "slow_widths": losers}
                print(f"{runtime} {kind} {precision} b{batch}: multiple {multiple}", flush=True)
    found = [v["fast_multiple"] for b in result["batches"].values() for v in b.values()]
    result["multiple"] = None if None in found else max(found)
    return result


def isa_family(isa: list[str]) -> str:
    if "amx_int8" in isa:
        return "amx"
    if "avx512_vnni" in isa or "avx_vnni" in isa:
        return "vnni"
    if "avx2" in isa:
        return "avx2"
    return "other"


def markdown(blob: dict) -> str:
    lines = [machine_markdown(blob["machine"]), "", f"Made by `{blob['command']}` ({blob['seconds']} s); ISA family "
             f"`{blob['isa_family']}`. Median ms per call, every width of one runtime, layer kind and precision timed "
             f"round-robin ({blob['repeats']} passes of {blob['iters']} calls), one thread. A multiple is fast when "
             f"no width that is a multiple of it takes longer than a larger one in every pass (by more than "
             f"{blob['tolerance']:.0%}). The runtime's multiple is the largest over precisions and batch sizes; "
             "`targets/<runtime>.toml` records its conv multiple for this ISA family under `[channel_multiple_by_isa]` "
             "(a CNN's channel groups are convolution widths).",
             ""]
    for r in blob["results"]:
        widths = r["widths"]
        lines += [f"### {r['runtime']}, {r['kind']}: multiple {r['multiple']}", "",
                  "| precision | batch | " + " | ".join(str(w) for w in widths) + " | fast multiple |",
                  "|---|---|" + "---|" * len(widths) + "---|"]
        for batch, by in r["batches"].items():
            for precision, v in by.items():
                lines.append(f"| {precision} | {batch} | " + " | ".join(f"{v['p50_ms'][str(w)]:.3f}" for w in widths)
                             + f" | {v['fast_multiple']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--only", choices=RUNTIMES)
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)  # run_all's tests
    args = ap.parse_args()
    if args.parse_only:
        return
    if args.render_only:
        replace_section("width", HEADING, markdown(json.loads(RESULTS.read_text())))
        return
    torch.set_num_threads(1)
    start = time.time()
    results = [measure(rt, kind, args.iters, args.repeats, args.tolerance)
               for rt in ([args.only] if args.only else RUNTIMES) for kind in ("conv", "linear")]
    m = machine()
    blob = {"results": results, "machine": m, "isa_family": isa_family(m["isa"]), "iters": args.iters,
            "repeats": args.repeats, "tolerance": args.tolerance, "seconds": round(time.time() - start),
            "command": " ".join(["python bench/width_bench.py", *sys.argv[1:]])}
    publish(RESULTS, blob, "width", HEADING, markdown(blob))


if __name__ == "__main__":
    main()
