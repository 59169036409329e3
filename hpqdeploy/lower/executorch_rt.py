"""ExecuTorch with the XNNPACK delegate: one `.pte` program per fixed batch size, from the plan's per-layer configs.

XNNPACK narrows a dynamic batch dimension during lowering, so each batch size the export needs gets its own program
(`model_b{N}.pte`); `Session` picks the program matching the input batch. How the plan becomes XNNPACK's
quantization is in `executorch_quant`. The thread pool is process-wide and must be sized before any program loads:
resizing it afterwards crashes, so a second size in one process is refused.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import Lowered, LoweringContext, Runtime, Session, register_runtime
from hpqdeploy.lower.executorch_quant import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY, apply_torchao, float_twin, \
    keep_plan_ranges, static_quantizer

TEXT_INPUTS = ("input_ids", "attention_mask")  # `TextClassifier.forward` order
_PROGRAM = "model_b{}.pte"
_XNN_PRECISION = {"xnn_datatype_qcint8": "int8 per-channel", "xnn_datatype_qcint4": "int4 per-channel",
                  "xnn_datatype_qbint4": "int4 per-group", "xnn_datatype_qint8": "int8 per-tensor",
                  "xnn_datatype_qint32": "int32 (bias)", "xnn_datatype_qcint32": "int32 (bias)",
                  "xnn_datatype_fp32": "float32", "xnn_datatype_fp16": "float16", "xnn_datatype_bf16": "bfloat16"}
_NUMPY = {"xnn_datatype_qcint8": np.int8, "xnn_datatype_qint8": np.int8, "xnn_datatype_qint32": np.int32,
          "xnn_datatype_qcint32": np.int32, "xnn_datatype_fp32": np.float32, "xnn_datatype_fp16": np.float16}
_SCALAR_TYPES = {"FLOAT": "float32", "HALF": "float16", "BFLOAT16": "bfloat16", "CHAR": "int8", "BYTE": "uint8",
                 "INT": "int32", "LONG": "int64", "BOOL": "bool"}
_programs_loaded = False


def _args(inputs) -> tuple[torch.Tensor, ...]:
    return tuple(inputs[k] for k in TEXT_INPUTS) if isinstance(inputs, dict) else (inputs,)


def _rows(inputs, n: int):
    """`inputs` with its batch made n rows long (first rows repeated): an example of the right shape."""
    def fit(t):
        reps = math.ceil(n / t.shape[0])
        return t.repeat(reps, *[1] * (t.dim() - 1))[:n].contiguous()

    return {k: fit(v) for k, v in inputs.items()} if isinstance(inputs, dict) else fit(inputs)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _quantize_static(model, plans, ctx: LoweringContext) -> tuple[torch.nn.Module, list[str]]:
    """PT2E static int8 for the plan's static layers: export with a free batch, observe, convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not ctx.calib:
        raise UserError("ExecuTorch lowering needs calibration batches for XNNPACK's static int8 (none given)")
    example = _args(_rows(ctx.example_inputs, 2))
    free_batch = tuple({0: torch.export.Dim.AUTO} for _ in example)
    graph = torch.export.export(model, example, dynamic_shapes=free_batch).module()
    prepared = prepare_pt2e(graph, static_quantizer({n for n, p in plans.items() if p.role == STATIC}, ctx.modality))
    with torch.no_grad():
        for inputs, _ in ctx.calib:
            prepared(*_args(inputs))
    kept, shared = keep_plan_ranges(prepared, plans)
    notes = [f"activation scales: the plan's act_range kept at the input of {kept} static int8 layers"
             + (f"; calibrated on the calibration split ({len(ctx.calib)} batches) where XNNPACK shares the "
                f"observer with another tensor (or the plan has no range): {', '.join(shared)}" if shared else "")
             + "; XNNPACK's extra quantization points (layer outputs"
             + (", adds, pools" if ctx.modality == "image" else "")
             + ") calibrated on the same split (histogram observer)"]
    return convert_pt2e(prepared), notes


def _widths(plans, role: str) -> str:
    return ", ".join(sorted({f"{p.params.bits}-bit" + (f" group {p.params.group_size}" if p.params.group_size else "")
                             for p in plans.values() if p.role == role}))


@register_runtime("executorch")
class ExecuTorchRuntime(Runtime):
    extra = "executorch"
    modules = ("executorch", "torchao")

    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

        self.require()
        model, plans, notes = float_twin(ctx.model, ctx.example_inputs)
        roles = Counter(p.role for p in plans.values())
        apply_torchao(model, plans)
        if roles[DYNAMIC]:
            grouped = any(p.params.group_size for p in plans.values() if p.role == DYNAMIC)
            notes.append(f"{roles[DYNAMIC]} linear layer(s) ({_widths(plans, DYNAMIC)} weights) through torchao "
                         "Int8DynamicActivationIntxWeightConfig holding the plan's integer weights and scales; their "
                         "activations are quantized per token at run time (the plan: per tensor)"
                         + ("; XNNPACK stores per-group scales as bfloat16 (rounded by <= 2^-8)" if grouped else ""))
        if roles[WEIGHT_ONLY]:
            notes.append(f"{roles[WEIGHT_ONLY]} embedding table(s) ({_widths(plans, WEIGHT_ONLY)}) through torchao "
                         "IntxWeightOnlyConfig holding the plan's integers and scales, run by ExecuTorch's quantized "
                         "embedding kernels (portable, outside XNNPACK)")
        if not plans:
            notes.append("no quantized layers in the plan: the program runs float32")
        if roles[FLOAT]:
            notes.append(f"{roles[FLOAT]} layer(s) with float activations run float, holding the plan's dequantized "
                         "weights (stored as float32: XNNPACK's weight-only intx linear is unreliable)")
        try:
            if roles[STATIC]:
                model, qnotes = _quantize_static(model, plans, ctx)
                notes += [f"{roles[STATIC]} layer(s) static int8 (PT2E XNNPACKQuantizer, symmetric per-channel "
                          "weights reproducing the plan's scales)"] + qnotes
            files = []
            for batch in sorted(set(ctx.batch_sizes)):
                program = torch.export.export(model, _args(_rows(ctx.example_inputs, batch)))
                edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
                path = out_dir / _PROGRAM.format(batch)
                fuse = ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)  # -> quantized embedding kernels
                path.write_bytes(edge.to_executorch(fuse).buffer)
                outside = read_program(path)["non_delegated_ops"]
                if any(op.startswith("torchao::") for op in outside):
                    raise UserError(f"ExecuTorch has no kernel for {sorted(outside)}: a quantized pattern was not "
                                    "fused")
                files.append(path)
                notes.append(f"{path.name}: " + (", ".join(f"{op} x{n}" for op, n in sorted(outside.items()))
                                                 + " not delegated to XNNPACK" if outside
                                                 else "every op delegated to XNNPACK"))
        except UserError:
            raise
        except Exception as exc:  # an op or pattern ExecuTorch cannot take: one line for the user
            raise UserError(f"ExecuTorch lowering failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        notes.append("one program per fixed batch size (XNNPACK narrows a dynamic batch bound); each holds its own "
                     "copy of the weights")
        return Lowered(files, notes)

    def load(self, out_dir: Path, threads: int = 1) -> Session:
        from executorch.runtime import Runtime as EtRuntime

        global _programs_loaded
        paths = sorted(Path(out_dir).glob(_PROGRAM.format("*")))
        if not paths:
            raise UserError(f"{out_dir} holds no ExecuTorch program ({_PROGRAM.format('<N>')}); run export first")
        actual = _set_threads(threads)
        _load_quantized_kernels()
        methods = {}
        for path in paths:
            try:
                methods[int(path.stem.removeprefix("model_b"))] = \
                    EtRuntime.get().load_program(path).load_method("forward")
            except (RuntimeError, ValueError) as exc:
                raise UserError(f"{path} is not a loadable ExecuTorch program: {_first_line(exc)}") from None
            _programs_loaded = True
        return ExecuTorchSession(methods, actual)

    def inspect(self, out_dir: Path) -> dict:
        paths = sorted(Path(out_dir).glob(_PROGRAM.format("*")), key=lambda p: int(p.stem.removeprefix("model_b")))
        if not paths:
            raise UserError(f"{out_dir} holds no ExecuTorch program ({_PROGRAM.format('<N>')})")
        programs = {p.name: read_program(p) for p in paths}
        first = programs[paths[0].name]
        return {"read_from": "the .pte files themselves: the ExecuTorch program flatbuffer (kernel calls, delegate "
                             "calls, constant tensors) and each XNNPACK delegate's flatbuffer (tensor datatypes, "
                             "shapes, constant sizes); weights below are from " + paths[0].name,
                "ops": first["ops"], "delegates": first["delegates"], "xnnpack_ops": first["xnnpack_ops"],
                "non_delegated_ops": first["non_delegated_ops"], "weights": first["weights"],
                "weight_bytes": first["weight_bytes"], "other_constants": first["other_constants"],
                "programs": {name: {k: v[k] for k in ("delegates", "non_delegated_ops", "bytes")}
                             for name, v in programs.items()}}


def _set_threads(threads: int) -> int:
    from executorch.extension.pybindings import portable_lib

    current = portable_lib._threadpool_get_thread_count()
    if current != threads:
        if _programs_loaded:
            raise UserError(f"the ExecuTorch thread pool already runs {current} threads in this process and cannot "
                            f"be resized once a program is loaded; run with {threads} threads in a new process")
        portable_lib._unsafe_reset_threadpool(threads)
    return portable_lib._threadpool_get_thread_count()


def _load_quantized_kernels() -> None:
    """ExecuTorch's quantized kernels (the embedding_byte / embedding_4bit the programs call) ship as a library of
    their own; loading it registers them with the runtime the Python bindings use."""
    import ctypes

    import executorch

    library = Path(list(executorch.__path__)[0]) / "lib" / "libexecutorch_kernels_quantized.so"
    if library.is_file():
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # a second dlopen of one path is a no-op


class ExecuTorchSession(Session):
    def __init__(self, methods: dict, threads: int):
        self.methods = methods
        self.threads = threads

    def __call__(self, inputs) -> np.ndarray:
        arrays = [np.asarray(inputs[k]) for k in TEXT_INPUTS] if isinstance(inputs, dict) else [np.asarray(inputs)]
        arrays = [a.astype(np.int64 if a.dtype.kind in "iu" else np.float32, copy=False) for a in arrays]
        n, start, outs = arrays[0].shape[0], 0, []
        while start < n:  # the program of the input's batch; otherwise pad up (or cut into the largest batch)
            left = n - start
            batch = min((b for b in self.methods if b >= left), default=max(self.methods))
            take = min(batch, left)
            chunk = [a[start:start + take] for a in arrays]
            if take < batch:
                chunk = [np.concatenate([c, np.repeat(c[-1:], batch - take, axis=0)]) for c in chunk]
            out = self.methods[batch].execute([torch.from_numpy(np.ascontiguousarray(c)) for c in chunk])[0]
            outs.append(out[:take].numpy())
            start += take
        return np.concatenate(outs)

    def info(self) -> dict:
        return {"programs": [_PROGRAM.format(b) for b in sorted(self.methods)], "threads": self.threads,
                "backend": "XnnpackBackend"}


@dataclass
class XnnConstant:
    """A constant tensor of an XNNPACK delegate, as stored: values decoded (int4 unpacked), scales as float32."""

    precision: str
    dims: tuple[int, ...]
    nbytes: int  # values and scales on disk
    values: np.ndarray
    scales: np.ndarray | None


def read_program(path: Path) -> dict:
    """Kernel calls, delegate calls and constant tensors of one `.pte`, read from its flatbuffers."""
    from executorch.exir.schema import DelegateCall, KernelCall, Tensor

    data, pte = _deserialize(path)
    plan = pte.program.execution_plan[0]
    kernels, delegates, embedding_tables = Counter(), Counter(), {}
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, KernelCall):
                op = plan.operators[call.op_index]
                kernels[op.name + (f".{op.overload}" if op.overload else "")] += 1
                if op.name.startswith("quantized_decomposed::embedding_"):  # (weight, scales, zero points, ...)
                    embedding_tables[call.args[0]] = (op.name.rsplit("_", 1)[-1], call.args[1])
            elif isinstance(call, DelegateCall):
                delegates[plan.delegates[call.delegate_index].id] += 1
    weights, weight_bytes, other = Counter(), Counter(), Counter()
    for index, value in enumerate(plan.values):  # constants outside any delegate (embeddings, norms, indices)
        t = value.val
        if not (isinstance(t, Tensor) and t.data_buffer_idx > 0 and t.allocation_info is None):
            continue
        kind = _SCALAR_TYPES.get(t.scalar_type.name, t.scalar_type.name.lower())
        if index in embedding_tables:
            width, scales = embedding_tables[index]
            bits = {"byte": 8, "4bit": 4, "2bit": 2}.get(width, 8)
            n_groups = plan.values[scales].val.sizes[-1] if len(plan.values[scales].val.sizes) > 1 else 1
            columns = t.sizes[-1] * 8 // bits
            grouping = f"per-group {columns // n_groups}" if n_groups > 1 else "per-channel"
            label = f"int{bits} {grouping} (embedding, outside delegates)"
            weights[label] += math.prod(t.sizes) * 8 // bits
            weight_bytes[label] += math.prod(t.sizes)  # one byte per int8 value, or per two packed int4 values
        elif kind.startswith(("float", "bfloat")):
            weights[f"{kind} (outside delegates)"] += math.prod(t.sizes)
            weight_bytes[f"{kind} (outside delegates)"] += math.prod(t.sizes) * (2 if "16" in kind else 4)
        else:
            other[f"{kind} (outside delegates)"] += math.prod(t.sizes)
    xnn_ops = Counter()
    for graph, payload in _xnnpack_graphs(data, pte):
        xnn_ops.update(node["xnode_union_type"] for node in graph.get("xnodes", []))
        for c in _xnnpack_constants(graph, payload, pte):
            weights[c.precision] += c.values.size
            weight_bytes[c.precision] += c.nbytes
    return {"ops": dict(kernels + Counter({f"delegate:{k}": v for k, v in delegates.items()})),
            "delegates": dict(delegates), "non_delegated_ops": dict(kernels), "xnnpack_ops": dict(xnn_ops),
            "weights": dict(weights), "weight_bytes": dict(weight_bytes), "other_constants": dict(other),
            "bytes": len(data)}


def xnnpack_constants(path: Path) -> list[XnnConstant]:
    """Every constant tensor (weights, biases) inside the XNNPACK delegates of one `.pte`."""
    data, pte = _deserialize(path)
    return [c for graph, payload in _xnnpack_graphs(data, pte) for c in _xnnpack_constants(graph, payload, pte)]


def _deserialize(path: Path):
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = Path(path).read_bytes()
    try:
        return data, deserialize_pte_binary(data)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ExecuTorch program: {_first_line(exc)}") from None


def _xnnpack_graphs(data: bytes, pte):
    """(XNNGraph as JSON, raw payload) per XNNPACK delegate, decoded by the flatc executorch ships, with the
    delegate's own schema."""
    import importlib.resources

    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize as xgs
    from executorch.exir._serialize._flatbuffer import _get_flatc_path
    from executorch.exir._serialize._program import _extract_delegate_payload

    schema = importlib.resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    count = sum(1 for d in pte.program.execution_plan[0].delegates if "xnnpack" in d.id.lower())
    for index in range(count):
        payload = _extract_delegate_payload(data, "xnnpack", index)
        header = xgs.XNNHeader.from_bytes(payload[: xgs.XNNHeader.EXPECTED_LENGTH])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "schema.fbs").write_bytes(schema.read_bytes())
            (Path(tmp) / "graph.bin").write_bytes(
                payload[header.flatbuffer_offset: header.flatbuffer_offset + header.flatbuffer_size])
            subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--defaults-json", "-o", tmp,
                            str(Path(tmp) / "schema.fbs"), "--", str(Path(tmp) / "graph.bin")],
                           check=True, capture_output=True)
            text = (Path(tmp) / "graph.json").read_text()
        # flatc writes bare inf/nan (clamp bounds); JSON spells them Infinity/NaN
        text = re.sub(r"(?<=[:\[,\s])(-?)(inf|nan)\b", lambda m: m[1] + ("Infinity" if m[2] == "inf" else "NaN"), text)
        yield json.loads(text), payload[header.constant_data_offset:]


def _xnnpack_constants(graph: dict, constants: bytes, pte) -> list[XnnConstant]:
    entries = graph.get("constant_data", [])
    named = pte.named_data

    def blob(index: int) -> bytes:
        entry = entries[index]
        if entry.get("named_key"):  # weights live in the program's named data store, shared by key
            return named.buffers[named.pte_data[entry["named_key"]].buffer_index][: int(entry["size"])]
        return constants[int(entry["offset"]): int(entry["offset"]) + int(entry["size"])]

    out = []
    for value in graph.get("xvalues", []):
        body = value.get("xvalue_union", {})
        tensor = body.get("tensor_value", body)
        index = int(tensor.get("constant_buffer_idx", 0))
        if not index:
            continue
        dtype, dims = tensor.get("datatype", "?"), tuple(int(d) for d in tensor.get("dims", []))
        quant = body.get("quant_params", {})
        raw, scale_index = blob(index), int(quant.get("scale_buffer_idx", 0))
        scales = None
        if scale_index:
            scale_raw = blob(scale_index)
            scales = (np.frombuffer(scale_raw, np.uint16).astype(np.uint32) << 16).view(np.float32) \
                if dtype == "xnn_datatype_qbint4" else np.frombuffer(scale_raw, np.float32)  # qb4w: bf16 scales
        elif "scale" in quant:
            scales = np.atleast_1d(np.asarray(quant["scale"], np.float32))
        precision = _XNN_PRECISION.get(dtype, dtype)
        if dtype in ("xnn_datatype_qbint4", "xnn_datatype_qcint4"):  # two per byte, +8, low nibble first
            packed = np.frombuffer(raw, np.uint8)
            values = (np.stack([packed & 0xF, packed >> 4], -1).reshape(dims[0], -1)[:, : dims[-1]].astype(np.int8) - 8)
            precision += f" {quant['group_size']}" if quant.get("group_size") else ""
        else:
            values = np.frombuffer(raw, _NUMPY.get(dtype, np.uint8)).reshape(dims)
        out.append(XnnConstant(precision, dims, len(raw) + (len(blob(scale_index)) if scale_index else 0), values,
                               scales))
    return out
