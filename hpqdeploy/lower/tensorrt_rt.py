"""TensorRT (10.x, strongly typed, explicit quantization): a Q/DQ ONNX model that obeys TensorRT's rules, and the
engine built from it where TensorRT and a CUDA GPU exist.

TensorRT takes symmetric int8 only (zero point 0), so activations are re-quantized symmetrically from the plan's
ranges (`onnx_qdq.TENSORRT`), which is a real numerics change, measured by the export. Where no engine can be built
(no `tensorrt`, no GPU: as on the CPU machines here), the build is deferred to the device with an exact `trtexec`
command, the ONNX model is checked statically against TensorRT's Q/DQ rules and run in ONNX Runtime with its Q/DQ
evaluated as written (ORT's integer kernels would add their own saturation on CPUs without VNNI).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np

from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import Lowered, LoweringContext, Runtime, Session, register_runtime
from hpqdeploy.lower.onnx_qdq import TENSORRT, constants, dtype_name, export_qdq, inspect_onnx
from hpqdeploy.lower.onnxruntime_rt import OrtSession

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
BUILD_SCRIPT = "build_engine.sh"
MIN_OPSET, INT4_OPSET = 13, 21

# ONNX ops the TensorRT 10 ONNX parser imports (onnx-tensorrt docs/operators.md; TensorRT 10 added
# LayerNormalization, GroupNormalization, Gelu and IsInf to the 8.5 list).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Identity
If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())


# --------------------------------------------------------------------------------------------------------------
# The static rule check


def check_tensorrt_qdq(model) -> list[str]:
    """Every way `model` (an onnx.ModelProto) breaks TensorRT's explicit-quantization rules, one line each."""
    return _RuleCheck(model).run()


class _RuleCheck:
    def __init__(self, model):
        self.model, self.graph = model, model.graph
        self.consts = constants(self.graph)
        self.users: dict[str, list] = {}
        for n in self.graph.node:
            for i, name in enumerate(n.input):
                self.users.setdefault(name, []).append((n, i))
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self.violations: list[str] = []

    def run(self) -> list[str]:
        if self.opset is None or self.opset < MIN_OPSET:
            self.violations.append(f"opset {self.opset} is below {MIN_OPSET}: per-channel Q/DQ needs opset 13")
        for node in self.graph.node:
            where = node.name or node.output[0]
            if node.domain not in ("", "ai.onnx"):
                self.violations.append(f"{where}: {node.domain}.{node.op_type} is not an ONNX op TensorRT parses")
            elif node.op_type not in TENSORRT_OPS:
                self.violations.append(f"{where}: {node.op_type} is not an op TensorRT parses")
            elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                self._check_qdq(node, where)
        return self.violations

    def _dtype(self, name: str) -> str | None:
        return dtype_name(self.consts[name].data_type) if name in self.consts else None

    def _check_qdq(self, node, where: str) -> None:
        from onnx import numpy_helper

        add = self.violations.append
        attrs = {a.name: a.i for a in node.attribute}
        block = attrs.get("block_size", 0)
        scale_name = node.input[1]
        if scale_name not in self.consts:
            add(f"{where}: scale is not a constant (TensorRT needs build-time scales)")
        elif (numpy_helper.to_array(self.consts[scale_name]) <= 0).any():
            add(f"{where}: scales must be strictly positive")
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        q_type = self._dtype(zp_name) if zp_name else None
        if zp_name and zp_name not in self.consts:
            add(f"{where}: zero point is not a constant")
        elif zp_name and numpy_helper.to_array(self.consts[zp_name]).astype(np.int64).any():
            add(f"{where}: zero point must be 0 (TensorRT quantizes symmetrically)")
        if node.op_type == "QuantizeLinear":
            if q_type is None:  # no zero point: output_dtype (opset 21) decides, else ONNX's default uint8
                q_type = dtype_name(attrs["output_dtype"]) if attrs.get("output_dtype") else "uint8"
            if q_type != "int8":
                add(f"{where}: quantizes to {q_type}; TensorRT takes int8 activations only")
            if block:
                add(f"{where}: block quantization of activations is not an INT8 Q/DQ form TensorRT takes")
            elif node.input[0] not in self.consts and scale_name in self.consts \
                    and math.prod(self.consts[scale_name].dims) > 1:
                add(f"{where}: per-channel activation quantization; TensorRT quantizes activations per tensor")
            return
        data = node.input[0]
        weight = data in self.consts
        d_type = self._dtype(data) if weight else q_type
        if d_type is not None and d_type not in ("int8", "int4"):
            add(f"{where}: dequantizes {d_type}; TensorRT takes int8 (and int4 weight-only blocks)")
        if d_type == "int4" or block:
            self._check_int4_block(node, where, d_type, block, weight)
        elif weight and scale_name in self.consts and len(self.consts[scale_name].dims) == 1 \
                and self.consts[scale_name].dims[0] > 1:
            self._check_channel_axis(node, where, attrs.get("axis", 1))

    def _check_int4_block(self, node, where, d_type, block, weight) -> None:
        add = self.violations.append
        if d_type != "int4" or not block or not weight:
            add(f"{where}: INT4 is only for constant weights, block-quantized (block_size) in TensorRT")
            return
        if self.opset is None or self.opset < INT4_OPSET:
            add(f"{where}: INT4 block DequantizeLinear needs opset {INT4_OPSET}, the model has {self.opset}")
        if len(self.consts[node.input[0]].dims) != 2:
            add(f"{where}: INT4 block weights must be 2-D")
        users = self.users.get(node.output[0], [])
        if not users or any(n.op_type not in ("MatMul", "Gemm") or i != 1 for n, i in users):
            add(f"{where}: INT4 weights must feed MatMul/Gemm as their weight (TensorRT: weight-only GEMM)")

    def _check_channel_axis(self, node, where, axis) -> None:
        rank = len(self.consts[node.input[0]].dims)
        axis = axis % rank
        for user, slot in self.users.get(node.output[0], []):
            trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
            want = {("Conv", 1): 0, ("ConvTranspose", 1): 1, ("MatMul", 1): rank - 1,
                    ("Gemm", 1): 0 if trans_b else 1, ("Gather", 0): 0}.get((user.op_type, slot))
            if want is not None and axis != want:
                self.violations.append(f"{where}: per-channel axis {axis} is not the output channel ({want}) of "
                                       f"{user.op_type}")


# --------------------------------------------------------------------------------------------------------------
# Engine build (where TensorRT and a GPU exist) or the deferred build command


def engine_unavailable() -> str | None:
    """None where an engine can be built and run here, else why not."""
    import torch

    reasons = [] if torch.cuda.is_available() else ["no CUDA GPU"]
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        reasons.append("tensorrt is not installed")
    return ", ".join(reasons) or None


def profile_shapes(names: list[str], example, batch_sizes) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input: batch 1 to the largest batch the export evaluates, tuned for batch 1."""
    top = max(batch_sizes)
    shapes = {}
    for name in names:
        tail = tuple((example[name] if isinstance(example, dict) else example).shape[1:])
        shapes[name] = ((1, *tail), (1, *tail), (top, *tail))
    return shapes


def trtexec_command(shapes: dict) -> str:
    def flag(i):
        return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())

    return (f"trtexec --onnx={MODEL_FILE} --saveEngine={ENGINE_FILE} --stronglyTyped \\\n"
            f"    --minShapes={flag(0)} --optShapes={flag(1)} --maxShapes={flag(2)}")


def write_build_script(out_dir: Path, shapes: dict, int4: bool) -> Path:
    int4_note = "# This model has INT4 block weights (opset 21): it needs a TensorRT 10 release that parses opset 21.\n"
    path = out_dir / BUILD_SCRIPT
    path.write_text(f"""#!/bin/sh
# Build the TensorRT engine for {MODEL_FILE} on the device that will run it (an engine is specific to its GPU and
# TensorRT version). TensorRT 10.x, strongly typed: every precision comes from the Q/DQ nodes of the model, so no
# --int8/--fp16 flag and no calibration cache.
# TensorRT 8.5 (JetPack 5) differs: there is no --stronglyTyped (pass --int8 so the Q/DQ nodes are honoured, and
# --fp16 if the float parts may run in half precision), and its parser reads opsets <= 17 with no INT4.
{int4_note if int4 else ""}set -e
cd "$(dirname "$0")"
{trtexec_command(shapes)}
""")
    path.chmod(0o755)
    return path


def build_engine(onnx_path: Path, plan_path: Path, shapes: dict) -> None:
    """A strongly typed engine through the TensorRT Python API (10.x)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why)")
    plan_path.write_bytes(bytes(blob))


class TrtSession(Session):
    """Runs a serialized engine; device buffers are torch CUDA tensors (no pycuda needed)."""

    def __init__(self, plan: Path):
        import tensorrt as trt

        self.trt = trt
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise UserError(f"{plan} is not an engine this TensorRT version and GPU can load; rebuild it here")
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _device(self, name: str, array: np.ndarray):
        import torch

        dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).cuda()

    def __call__(self, inputs):
        import torch

        feeds = inputs if isinstance(inputs, dict) else {self.inputs[0]: inputs}
        keep = []
        for name in self.inputs:
            t = self._device(name, feeds[name])
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT failed to run the engine")
        stream.synchronize()
        return outs[self.outputs[0]].float().cpu().numpy()

    def info(self) -> dict:
        import torch

        return {"runtime": "tensorrt", "version": self.trt.__version__, "device": torch.cuda.get_device_name(),
                "engine": ENGINE_FILE}


# --------------------------------------------------------------------------------------------------------------


@register_runtime("tensorrt")
class TensorRT(Runtime):
    extra = "tensorrt"
    modules = ("onnx", "onnxruntime")  # what the checkable part needs; the engine needs `tensorrt` and a GPU

    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered:
        import onnx

        result = export_qdq(ctx.model, ctx.example_inputs, out_dir / MODEL_FILE, TENSORRT)
        violations = check_tensorrt_qdq(onnx.load(str(result.path)))
        if violations:
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise UserError(f"the model breaks TensorRT's Q/DQ rules: {violations[0]}{more}")
        notes = result.notes() + ["TensorRT Q/DQ rule check passed (zero points 0, int8/int4 only, no contrib ops, "
                                  f"ops TensorRT parses, opset {result.opset})"]
        shapes = profile_shapes(result.input_names, ctx.example_inputs, ctx.batch_sizes)
        files = list(result.files)
        reason = engine_unavailable()
        if reason is None:
            build_engine(result.path, out_dir / ENGINE_FILE, shapes)
            files.append(out_dir / ENGINE_FILE)
            notes.append("engine built with the TensorRT Python API (strongly typed) and saved as model.plan")
        else:
            int4 = any(layer.form == "block_dq_int4" for layer in result.layers.values())
            write_build_script(out_dir, shapes, int4)
            notes.append(f"engine build deferred to the device ({reason} here): run {BUILD_SCRIPT} there")
        return Lowered(files, notes)

    def load(self, out_dir: Path, threads: int = 1) -> Session:
        reason = engine_unavailable()
        if (out_dir / ENGINE_FILE).is_file() and reason is None:
            return TrtSession(out_dir / ENGINE_FILE)
        note = "checked in ONNX Runtime; " + ("no GPU here" if reason and "GPU" in reason else
                                              reason or "no engine was built")
        return OrtSession(out_dir / MODEL_FILE, threads, exact_qdq=True, note=note)

    def inspect(self, out_dir: Path) -> dict:
        import onnx

        contents = inspect_onnx(out_dir / MODEL_FILE)
        violations = check_tensorrt_qdq(onnx.load(str(out_dir / MODEL_FILE)))
        contents["tensorrt_rules"] = {"passed": not violations, "violations": violations}
        plan = out_dir / ENGINE_FILE
        contents["engine"] = {"file": ENGINE_FILE, "bytes": plan.stat().st_size} if plan.is_file() else \
            {"deferred": f"build on the device with {BUILD_SCRIPT}"}
        return contents
