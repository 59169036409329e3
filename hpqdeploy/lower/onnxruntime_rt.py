"""ONNX Runtime (CPU execution provider): the QDQ ONNX model of `onnx_qdq`, run in an InferenceSession.

What ORT really executes is decided by its graph optimizer (QDQ node groups become QLinearConv,
MatMulIntegerToFloat, ...; the rest runs in float), so `inspect` also reads back the optimized graph: the "hybrid not
slower" question is answered by which convolutions and matmuls ended up in integer kernels.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import Lowered, LoweringContext, Runtime, Session, register_runtime
from hpqdeploy.lower.onnx_qdq import ONNXRUNTIME, ONNXRUNTIME_NO_VNNI, export_qdq, inspect_onnx

MODEL_FILE = "model.onnx"
INTEGER_KERNELS = {"QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                   "MatMulNBits", "GatherBlockQuantized", "QAttention", "QEmbedLayerNormalization"}
FLOAT_COMPUTE = {"Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


def session_options(threads: int, exact_qdq: bool = False):
    """`exact_qdq` keeps Q/DQ as written (no fusion into ORT's integer kernels): the reference numerics of the graph,
    used where ORT only stands in for another runtime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if exact_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


class OrtSession(Session):
    def __init__(self, path: Path, threads: int = 1, exact_qdq: bool = False, note: str | None = None):
        import onnxruntime as ort

        if not path.is_file():
            raise UserError(f"{path} does not exist: nothing was lowered into {path.parent}")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, exact_qdq),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for invalid graphs and unsupported ops
            raise UserError(f"ONNX Runtime cannot load {path.name}: {str(exc).strip().splitlines()[0][:200]}") \
                from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.threads, self.exact_qdq, self.note = threads, exact_qdq, note

    def __call__(self, inputs):
        if isinstance(inputs, dict):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise UserError(f"the model needs input {missing[0]!r}; got {', '.join(inputs)}")
            feeds = {n: np.ascontiguousarray(inputs[n], dtype=np.int64) for n in self.input_names}
        else:
            feeds = {self.input_names[0]: np.ascontiguousarray(inputs, dtype=np.float32)}
        return self.session.run(None, feeds)[0]

    def info(self) -> dict:
        import onnxruntime as ort

        info = {"runtime": "onnxruntime", "version": ort.__version__, "providers": self.session.get_providers(),
                "intra_op_threads": self.threads, "inter_op_threads": 1, "execution_mode": "sequential",
                "graph_optimization": "all",
                "qdq_fusion": "off (Q/DQ evaluated as written)" if self.exact_qdq else "on (ORT integer kernels)"}
        if self.note:
            info["note"] = self.note
        return info


def optimized_graph(path: Path) -> dict:
    """The ops ORT's optimizer turns the graph into (level "extended": where the QDQ fusions happen; "all" adds only
    machine-specific layout changes): which compute ops run in integer kernels and which stay float, in total and
    per layer (`fast_path`)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(1)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    ops = Counter(n.op_type for n in graph.node)
    return {"level": "extended",
            "integer_kernels": {k: v for k, v in sorted(ops.items())
                                if k in INTEGER_KERNELS or k.startswith("QLinear")},
            "float_compute": {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE},
            "quantize_dequantize": {k: ops[k] for k in ("QuantizeLinear", "DequantizeLinear") if ops[k]},
            "fast_path": fast_path(static_int8_layers(onnx.load(str(path)).graph), graph)}


def static_int8_layers(graph) -> list[str]:
    """Layers written with static int8 activations: a Conv/MatMul/Gemm whose weight is DequantizeLinear of the
    constant `<layer>.weight_quantized` and whose input is DequantizeLinear of a QuantizeLinear, or a
    MatMulIntegerToFloat reading that constant."""
    producer = {out: n for n in graph.node for out in n.output}
    layers = []
    for n in graph.node:
        if n.op_type == "MatMulIntegerToFloat" and n.input[1].endswith(".weight_quantized"):
            layers.append(n.input[1].removesuffix(".weight_quantized"))  # written in ORT's integer form already
            continue
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        w, x = producer.get(n.input[1]), producer.get(n.input[0])
        if (w is not None and w.op_type == "DequantizeLinear" and w.input[0].endswith(".weight_quantized")
                and x is not None and x.op_type == "DequantizeLinear"
                and getattr(producer.get(x.input[0]), "op_type", None) == "QuantizeLinear"):
            layers.append(w.input[0].removesuffix(".weight_quantized"))
    return layers


def fast_path(layers: list[str], optimized) -> dict:
    """For each static int8 layer, the op that reads its integer weight once ORT has optimized the graph: an integer
    kernel (QLinearConv, QGemm, MatMulIntegerToFloat, ...) or DequantizeLinear feeding a float op (a fallback)."""
    readers: dict[str, str] = {}
    consumers: dict[str, list] = {}
    for n in optimized.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for layer in layers:
        ops = consumers.get(f"{layer}.weight_quantized", [])
        kinds = set()
        for n in ops:
            if n.op_type == "DequantizeLinear":
                kinds.update(f"{c.op_type} (float)" for c in consumers.get(n.output[0], []))
            else:
                kinds.add(n.op_type)
        readers[layer] = ", ".join(sorted(kinds)) or "removed"
    floating = sorted(k for k, v in readers.items() if "(float)" in v or v == "removed")
    return {"quantized": len(layers), "integer": len(layers) - len(floating), "float": floating, "by_layer": readers}


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    extra = "onnx"
    modules = ("onnx", "onnxruntime")
    int8_pairs_saturate = True  # its u8 x s8 kernels on x86 without VNNI; the u8 x u8 ones are exact everywhere
    overflow_fix_by = "unsigned"

    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered:
        flavor = ONNXRUNTIME_NO_VNNI if ctx.overflow_fix else ONNXRUNTIME
        result = export_qdq(ctx.model, ctx.example_inputs, out_dir / MODEL_FILE, flavor)
        notes = result.notes()
        if any(layer.form == "dq_int8" for layer in result.layers.values()):
            notes.append("8-bit weights stored as uint8 with zero point 128 (the same values as int8 with zero point "
                         "0) for ORT's u8 x u8 kernels, exact on x86 CPUs without VNNI (`--overflow-fix`)"
                         if ctx.overflow_fix else
                         "8-bit weights stored as int8 for ORT's u8 x s8 kernels: exact on CPUs with VNNI, not on "
                         "x86 CPUs without it; export with `--overflow-fix on` for those")
        return Lowered(result.files, notes)

    def load(self, out_dir: Path, threads: int = 1) -> Session:
        return OrtSession(out_dir / MODEL_FILE, threads)

    def inspect(self, out_dir: Path) -> dict:
        contents = inspect_onnx(out_dir / MODEL_FILE)
        contents["optimized"] = optimized_graph(out_dir / MODEL_FILE)
        contents["fast_path"] = contents["optimized"].pop("fast_path")
        return contents
