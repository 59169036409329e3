"""OpenVINO (CPU plugin): the plan's quantization as an IR (`model.xml` + `model.bin`) the CPU plugin executes.

The legalized model is converted by OpenVINO's PyTorch frontend under `export_form.export_form()`, so the plan's
8-bit per-channel weights and static activation ranges arrive as FakeQuantize: OpenVINO stores weight FakeQuantize
as i8 constants + Convert + Multiply and keeps activation FakeQuantize (256 levels), from which the CPU plugin
builds int8 convolutions and matmuls.

Weights the runtime executes weight-only (4-bit linear/embedding parts, or per-group) are not recomputed by
`nncf.compress_weights`, which would choose its own scales and store them in f16. Before conversion each such layer
is pinned to the plan's dequantized weight (`ints * scales`, exactly what PyTorch computes), the resulting f32
constant is found in the converted graph by value, and it is replaced by the plan's integers and scales in the
form `nncf.compress_weights` produces (i4/i8 Constant -> Convert -> Multiply [-> Reshape for groups]), with f32
scales so the plan's scales are kept bit for bit. The CPU plugin fuses that form into FullyConnected/Gather with
compressed weights.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpqdeploy.core.export_form import export_form, exports_int8_fake_quant
from hpqdeploy.core.qparams import dequantized_weight, quant_params
from hpqdeploy.core.quantize import QEmbedding, QLinear, _QuantMixin
from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import Lowered, LoweringContext, Runtime, Session, register_runtime
from hpqdeploy.lower.cpu import int8_dot_product
from hpqdeploy.lower.torch_prep import fold_batchnorm

MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
# precision option -> INFERENCE_PRECISION_HINT (None: the CPU plugin's own default, bf16 on CPUs with native bf16)
PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16", "default": None}
# On some CPUs the plugin also quantizes the activations of layers with compressed weights to int8 on the fly, under
# any precision hint (groups of 32 on a Xeon with AMX; not on an AMD EPYC with AVX2 only): a
# 4-bit weight-only layer of the plan then runs as w4a8, 3.7e-3 off on outputs of ~0.5 in
# test_grouped_four_bit_weights (0 without it). "f32" asks for the plan's numerics, so it turns that off;
# "default" keeps the plugin's own choices and reports them.
_PLAN_NUMERICS = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
WEIGHT_OPS = {"Convolution": (1,), "GroupConvolution": (1,), "MatMul": (0, 1), "Gather": (0,)}
# ops between a weight constant and its consumer (decompression, FakeQuantize on weights, layout)
_WEIGHT_PATH = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "FakeQuantize"}
_INDEX_TYPES = {"i32", "i64", "boolean"}  # constants of these types are index tables or shapes, not weights


def _compile_config(precision: str, threads: int) -> dict:
    """The CPU plugin's settings for one of PRECISIONS: what `load` runs and `inspect` reports."""
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if PRECISIONS[precision]:
        config["INFERENCE_PRECISION_HINT"] = PRECISIONS[precision]
    if precision == "f32":
        config.update(_PLAN_NUMERICS)
    return config


class _PinnedLinear(QLinear):
    """A weight-only layer whose weight is the plan's dequantized tensor itself, one constant in the traced graph."""

    def qweight(self):
        return self.dequantized


class _PinnedEmbedding(QEmbedding):
    def qweight(self):
        return self.dequantized


@dataclass
class _WeightOnly:
    layer: str
    dequantized: np.ndarray  # f32, the weight's shape: what the converted graph holds before compression
    ints: np.ndarray  # int8 values in [-q, q]
    scales: np.ndarray  # f32 (out, n_groups)
    bits: int
    group_size: int | None


def _pin_weight_only_layers(model: torch.nn.Module) -> list[_WeightOnly]:
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, _QuantMixin) or exports_int8_fake_quant(m):
            continue
        bits = int(m.w_bits.max())
        if not isinstance(m, (QLinear, QEmbedding)):
            raise UserError(f"OpenVINO runs convolutions with 8-bit per-channel weights only; {name} has "
                            f"{bits}-bit weights (export with --target openvino legalizes them)")
        p = quant_params(m)
        dequantized = dequantized_weight(p)
        m.register_buffer("dequantized", dequantized.detach().clone())
        m.__class__ = _PinnedLinear if isinstance(m, QLinear) else _PinnedEmbedding
        layers.append(_WeightOnly(name, dequantized.numpy(), p.int_weight.numpy(), p.scales.numpy(), p.bits,
                                  p.group_size))
    return layers


def _compressed_weight(w: _WeightOnly):
    """i4/i8 Constant -> Convert(f32) -> Multiply(f32 scales) [-> Reshape]: NNCF's form, with the plan's numbers."""
    import openvino as ov
    from openvino import opset13 as ops

    out = w.ints.shape[0]
    etype = ov.Type.i4 if w.bits <= 4 else ov.Type.i8
    if w.group_size:
        ints, scales = w.ints.reshape(out, -1, w.group_size), w.scales.reshape(out, -1, 1)
    else:
        ints, scales = w.ints.reshape(out, -1), w.scales.reshape(out, 1)
    weight = ops.constant(ints, dtype=etype, name=f"{w.layer}.weight/{etype.get_type_name()}")
    scale = ops.constant(scales.astype(np.float32), name=f"{w.layer}.weight/scale")
    node = ops.multiply(ops.convert(weight, ov.Type.f32), scale, name=f"{w.layer}.weight/decompressed")
    if w.group_size:
        node = ops.reshape(node, ops.constant(np.array(w.dequantized.shape, dtype=np.int64)), special_zero=False)
    return node


def _compress(ov_model, layers: list[_WeightOnly]) -> None:
    for w in layers:
        found = [op for op in ov_model.get_ops()
                 if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "f32"
                 and tuple(op.get_output_shape(0)) == w.dequantized.shape
                 and np.array_equal(op.get_data(), w.dequantized)]
        if not found:
            raise RuntimeError(f"OpenVINO lowering: the weight of {w.layer} is not a constant in the converted graph")
        new = _compressed_weight(w)
        for const in found:
            for target in list(const.output(0).get_target_inputs()):
                target.replace_source_output(new.output(0))
    ov_model.validate_nodes_and_infer_types()


def _convert(model: torch.nn.Module, example):
    """Trace (TorchScript) and convert; batch 2 so nothing is specialised to a batch of one."""
    import openvino as ov

    if isinstance(example, dict):
        example = {k: torch.cat([v[:1], v[:1]]) for k, v in example.items()}
    else:
        example = torch.cat([example[:1], example[:1]])
    try:
        with export_form(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ov.convert_model(model, example_input=example)
    except Exception as exc:  # unsupported op or untraceable model: the frontend's first line says which
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"OpenVINO cannot convert this model: {first[:300]}") from None


def _fix_shapes(ov_model, example) -> None:
    """Dynamic batch; every other dimension (channels, image size, text length) as in the example."""
    import openvino as ov

    by_name = example if isinstance(example, dict) else {inp.get_any_name(): example for inp in ov_model.inputs}
    shapes = {}
    for inp in ov_model.inputs:
        t = by_name.get(inp.get_any_name())
        if t is None:
            raise RuntimeError(f"OpenVINO lowering: model input {inp.get_any_name()!r} is not in the example inputs")
        shapes[inp] = ov.PartialShape([-1, *t.shape[1:]])
    ov_model.reshape(shapes)


class OpenVINOSession(Session):
    def __init__(self, compiled, info: dict):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.names = [inp.get_any_name() for inp in compiled.inputs]
        self._info = info

    def __call__(self, inputs):
        feed = {n: inputs[n] for n in self.names} if isinstance(inputs, dict) else {0: inputs}
        result = self.request.infer(feed)
        return np.array(result[self.compiled.output(0)], copy=True)  # the request reuses its output buffer

    def info(self) -> dict:
        return self._info


@register_runtime("openvino")
class OpenVINORuntime(Runtime):
    extra = "openvino"
    int8_pairs_saturate = True  # x86 int8 kernels without VNNI: see legalize.narrow_int8_weights
    modules = ("openvino",)  # nncf is not needed: compressed weights are built from the plan with OpenVINO's opset

    def __init__(self, precision: str = "f32"):
        if precision not in PRECISIONS:
            raise UserError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision  # "default" compiles with the CPU plugin's own hint, to compare against f32

    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered:
        import openvino as ov

        model = copy.deepcopy(ctx.model).eval()
        folded = fold_batchnorm(model)
        weight_only = _pin_weight_only_layers(model)
        ov_model = _convert(model, ctx.example_inputs)
        _fix_shapes(ov_model, ctx.example_inputs)
        _compress(ov_model, weight_only)
        xml = out_dir / MODEL_XML
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        fq = sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())
        notes = [f"BatchNorm folded into {folded} convolutions before conversion",
                 "batch dimension dynamic; other input dimensions fixed as in the evaluation data"]
        if fq:
            notes.append(f"the plan's 8-bit per-channel weights and static activation ranges converted as FakeQuantize "
                         f"({fq} activation FakeQuantize kept, the plan's ranges, no OpenVINO/NNCF calibration; "
                         f"weight FakeQuantize stored by OpenVINO as i8 + per-channel scale)")
        if weight_only:
            kinds = Counter(f"{w.bits}-bit {'group ' + str(w.group_size) if w.group_size else 'per-channel'}"
                            for w in weight_only)
            notes.append(
                "weight-only layers (" + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())) + ") stored as "
                "compressed constants built from the plan's integer weights and scales (i4/i8 Constant -> Convert -> "
                "Multiply, f32 scales, the form nncf.compress_weights produces); nncf.compress_weights was not "
                "called, so no scale was recomputed")
        return Lowered([xml, out_dir / MODEL_BIN], notes)

    def load(self, out_dir: Path, threads: int = 1) -> Session:
        import openvino as ov

        xml = _model_path(out_dir)
        core = ov.Core()
        compiled = core.compile_model(str(xml), "CPU", _compile_config(self.precision, threads))
        info = {
            "device": "CPU",
            "openvino": ov.get_version(),
            "precision_requested": self.precision,
            "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "cpu_default_precision": _type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "dynamic_activation_quantization_group": int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")),
            "cpu_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "int8_dot_product": int8_dot_product(),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        }
        return OpenVINOSession(compiled, info)

    def inspect(self, out_dir: Path) -> dict:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(_model_path(out_dir)))
        ops = model.get_ops()
        constants: dict[str, dict] = {}
        for op in ops:
            if op.get_type_name() == "Constant":
                entry = constants.setdefault(op.get_element_type().get_type_name(), {"count": 0, "elements": 0})
                entry["count"] += 1
                entry["elements"] += int(np.prod(op.get_output_shape(0)))
        fqs = [op for op in ops if op.get_type_name() == "FakeQuantize"]
        weights: Counter = Counter()
        by_op: dict[str, Counter] = {}
        compressed = []
        activation_fq: dict[str, dict] = {}
        for op in ops:
            kind = op.get_type_name()
            if kind not in WEIGHT_OPS:
                continue
            found = [_weight_constant(op.input(i).get_source_output().get_node()) for i in WEIGHT_OPS[kind]]
            const = next((c for c in found if c is not None), None)
            if const is None:  # a Gather of indices or a MatMul of two activations
                continue
            etype = const.get_element_type().get_type_name()
            weights[etype] += int(np.prod(const.get_output_shape(0)))
            by_op.setdefault(kind, Counter())[etype] += 1
            if etype != "f32" and kind in ("MatMul", "Gather"):
                compressed.append({"op": kind, "layer": _layer_name(op), "weight": etype,
                                   "shape": list(const.get_output_shape(0))})
            if kind != "Gather":
                data = [i for i, c in zip(WEIGHT_OPS[kind], found) if c is None] or [0]
                src = op.input(data[0]).get_source_output().get_node().get_type_name()
                entry = activation_fq.setdefault(kind, {"total": 0, "fake_quantized": 0})
                entry["total"] += 1
                entry["fake_quantized"] += src == "FakeQuantize"
        runtime = _executed_precisions(core, model)
        return {
            "fast_path": runtime.pop("fast_path"),
            "format": "OpenVINO IR",
            "ops": dict(Counter(op.get_type_name() for op in ops).most_common()),
            "weights": dict(weights),
            "weights_by_op": {k: dict(v) for k, v in by_op.items()},
            "fake_quantize": {"count": len(fqs),
                              "levels": dict(Counter(str(op.get_attributes()["levels"]) for op in fqs))},
            "activation_fake_quantize": activation_fq,
            "compressed_weights": compressed,
            "constants": constants,
            "inputs": {i.get_any_name(): f"{i.get_element_type().get_type_name()}{i.get_partial_shape()}"
                       for i in model.inputs},
            "runtime": runtime,
        }


def _model_path(out_dir: Path) -> Path:
    xml = Path(out_dir) / MODEL_XML
    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        raise UserError(f"{out_dir} holds no OpenVINO IR ({MODEL_XML} + {MODEL_BIN})")
    return xml


def _type_name(t) -> str:
    return t.get_type_name() if hasattr(t, "get_type_name") else str(t)


def _weight_constant(node):
    """The Constant a weight input is decompressed from, or None when the input is an activation."""
    while node.get_type_name() in _WEIGHT_PATH:
        node = node.input(0).get_source_output().get_node()
    if node.get_type_name() != "Constant" or node.get_element_type().get_type_name() in _INDEX_TYPES:
        return None
    return node if len(node.get_output_shape(0)) >= 2 else None


def _layer_name(op) -> str:
    """`__module.hf.bert.encoder.layer.0.output.dense/aten::linear/MatMul` -> `hf.bert.encoder.layer.0.output.dense`."""
    return _layer_name_of(op.get_friendly_name())


def static_int8_layers(model) -> list[str]:
    """Layers of the IR with static int8 activations: a Convolution/MatMul reading a FakeQuantize and a weight
    constant."""
    layers = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "MatMul"):
            continue
        sources = [op.input(i).get_source_output().get_node() for i in range(2)]
        if sources[0].get_type_name() == "FakeQuantize" and _weight_constant(sources[1]) is not None:
            layers.append(_layer_name(op))
    return layers


def fast_path(model, runtime_model) -> dict:
    """For each static int8 layer of the IR, the precision the CPU plugin runs it in (its runtime model: the layer
    type and `runtimePrecision` of the compiled op that the layer's IR op went into); u8/i8 is the integer path."""
    static = set(static_int8_layers(model))
    readers: dict[str, str] = {}
    for op in runtime_model.get_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str)
        if kind not in ("Convolution", "FullyConnected", "MatMul"):
            continue
        for original in rt["originalLayersNames"].astype(str).split(","):
            layer = _layer_name_of(original)
            if layer in static:
                readers[layer] = f"{kind} {rt['runtimePrecision'].astype(str)}"
    floating = sorted(layer for layer in static if readers.get(layer, "").split(" ")[-1] not in ("u8", "i8"))
    return {"quantized": len(static), "integer": len(static) - len(floating), "float": floating,
            "by_layer": {layer: readers.get(layer, "not found in the runtime model") for layer in sorted(static)}}


def _layer_name_of(friendly: str) -> str:
    return friendly.split("/")[0].removeprefix("__module.")


def _executed_precisions(core, model) -> dict:
    """What the CPU plugin really runs: per compute layer type, its runtime precision, as `load` compiles it for f32
    and (where it differs) with the plugin's default hint. Compiling a small IR takes well under a second."""
    default = _type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    result: dict = {"cpu_default_hint": default,
                    "cpu_default_dynamic_activation_quantization_group":
                        int(core.get_property("CPU", "DYNAMIC_QUANTIZATION_GROUP_SIZE"))}
    for hint in dict.fromkeys(["f32", default]):
        compiled = core.compile_model(model, "CPU", _compile_config("f32" if hint == "f32" else "default", 1))
        if hint == "f32":  # what `load` compiles
            result["fast_path"] = fast_path(model, compiled.get_runtime_model())
        layers: dict[str, Counter] = {}
        for op in compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            kind = rt["layerType"].astype(str)
            if kind == "Gather" and op.input(0).get_source_output().get_node().get_rt_info()["layerType"] \
                    .astype(str) != "Const":
                continue  # an index gather, not an embedding table
            if kind in ("Convolution", "FullyConnected", "MatMul", "Gather"):
                layers.setdefault(kind, Counter())[rt["runtimePrecision"].astype(str)] += 1
        result[hint] = {k: dict(v) for k, v in layers.items()}
    return result
