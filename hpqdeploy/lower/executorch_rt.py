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
from pathlib import Path

import numpy as np
import torch

from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import Lowered, LoweringContext, Runtime, Session, register_runtime
from hpqdeploy.lower.executorch_quant import DYNAMIC, FLOAT, STATIC, apply_dynamic, float_twin, \
    keep_plan_activation_ranges, static_quantizer

TEXT_INPUTS = ("input_ids", "attention_mask")  # `TextClassifier.forward` order
_PROGRAM = "model_b{}.pte"
_XNN_PRECISION = {"xnn_datatype_qcint8": "int8 per-channel", "xnn_datatype_qcint4": "int4 per-channel",
                  "xnn_datatype_qbint4": "int4 per-group", "xnn_datatype_qint8": "int8 per-tensor",
                  "xnn_datatype_qint32": "int32 (bias)", "xnn_datatype_qcint32": "int32 (bias)",
                  "xnn_datatype_fp32": "float32", "xnn_datatype_fp16": "float16", "xnn_datatype_bf16": "bfloat16"}
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
    kept, shared = keep_plan_activation_ranges(prepared, plans)
    notes = [f"activation scales: the plan's act_range kept at the input of {kept} static int8 layers"
             + (f"; calibrated on the calibration split ({len(ctx.calib)} batches) where XNNPACK shares the "
                f"observer with another tensor: {', '.join(shared)}" if shared else "")
             + "; XNNPACK's extra quantization points (layer outputs"
             + (", adds, pools" if ctx.modality == "image" else "")
             + f") calibrated on the same split (histogram observer)"]
    return convert_pt2e(prepared), notes


def _outside_delegates(graph) -> Counter:
    ops = Counter()
    for node in graph.nodes:
        if node.op != "call_function" or "getitem" in str(node.target):
            continue
        if "executorch_call_delegate" not in str(node.target):
            ops[str(getattr(node.target, "__name__", node.target))] += 1
    return ops


@register_runtime("executorch")
class ExecuTorchRuntime(Runtime):
    extra = "executorch"
    modules = ("executorch", "torchao")

    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        self.require()
        model, plans, notes = float_twin(ctx.model)
        roles = Counter(p.role for p in plans.values())
        apply_dynamic(model, plans)
        if roles[DYNAMIC]:
            bits = sorted({f"{p.params.bits}-bit" + (f" group {p.params.group_size}" if p.params.group_size else "")
                           for p in plans.values() if p.role == DYNAMIC})
            notes.append(f"{roles[DYNAMIC]} linear layers ({', '.join(bits)} weights) through torchao "
                         "Int8DynamicActivationIntxWeightConfig holding the plan's integer weights and scales; their "
                         "activations are quantized per token at run time (the plan: per tensor)")
        if roles[FLOAT]:
            notes.append(f"{roles[FLOAT]} layers with float activations run float, holding the plan's dequantized "
                         "weights (stored as float32)")
        try:
            if roles[STATIC]:
                model, qnotes = _quantize_static(model, plans, ctx)
                notes += [f"{roles[STATIC]} layers static int8 (PT2E XNNPACKQuantizer, symmetric per-channel "
                          "weights reproducing the plan's scales)"] + qnotes
            files = []
            for batch in sorted(set(ctx.batch_sizes)):
                program = torch.export.export(model, _args(_rows(ctx.example_inputs, batch)))
                edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
                outside = _outside_delegates(edge.exported_program().graph_module.graph)
                path = out_dir / _PROGRAM.format(batch)
                path.write_bytes(edge.to_executorch().buffer)
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
                "weight_bytes": first["weight_bytes"],
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


def read_program(path: Path) -> dict:
    """Kernel calls, delegate calls and constant tensors of one `.pte`, read from its flatbuffers."""
    from executorch.exir._serialize._program import _extract_delegate_payload, deserialize_pte_binary
    from executorch.exir.schema import DelegateCall, KernelCall, Tensor

    data = path.read_bytes()
    try:
        plan = deserialize_pte_binary(data).program.execution_plan[0]
    except Exception as exc:
        raise UserError(f"{path} is not a readable ExecuTorch program: {_first_line(exc)}") from None
    kernels, delegates = Counter(), Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, KernelCall):
                op = plan.operators[call.op_index]
                kernels[op.name + (f".{op.overload}" if op.overload else "")] += 1
            elif isinstance(call, DelegateCall):
                delegates[plan.delegates[call.delegate_index].id] += 1
    weights, weight_bytes, xnn_ops = Counter(), Counter(), Counter()
    for value in plan.values:  # constants the program itself holds, outside any delegate
        t = value.val
        if isinstance(t, Tensor) and t.data_buffer_idx > 0 and t.allocation_info is None:
            label = f"{t.scalar_type.name.lower()} (outside delegates)"
            weights[label] += math.prod(t.sizes)
    for index in range(sum(1 for d in plan.delegates if "xnnpack" in d.id.lower())):
        graph = _xnnpack_graph(_extract_delegate_payload(data, "xnnpack", index))
        xnn_ops.update(node["xnode_union_type"] for node in graph.get("xnodes", []))
        for label, elements, size in _xnnpack_constants(graph):
            weights[label] += elements
            weight_bytes[label] += size
    ops = Counter(kernels)
    ops.update({f"delegate:{k}": v for k, v in delegates.items()})
    return {"ops": dict(ops), "delegates": dict(delegates), "non_delegated_ops": dict(kernels),
            "xnnpack_ops": dict(xnn_ops), "weights": dict(weights), "weight_bytes": dict(weight_bytes),
            "bytes": len(data)}


def _xnnpack_graph(payload: bytes | None) -> dict:
    """An XNNPACK delegate's XNNGraph as JSON, decoded by flatc (shipped with executorch) with the delegate's schema."""
    import importlib.resources

    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize as xgs
    from executorch.exir._serialize._flatbuffer import _get_flatc_path

    if not payload:
        return {}
    header = xgs.XNNHeader.from_bytes(payload[: xgs.XNNHeader.EXPECTED_LENGTH])
    flat = payload[header.flatbuffer_offset: header.flatbuffer_offset + header.flatbuffer_size]
    schema = importlib.resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "schema.fbs").write_bytes(schema.read_bytes())
        (Path(tmp) / "graph.bin").write_bytes(flat)
        subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--defaults-json", "-o", tmp,
                        str(Path(tmp) / "schema.fbs"), "--", str(Path(tmp) / "graph.bin")],
                       check=True, capture_output=True)
        text = (Path(tmp) / "graph.json").read_text()
    return json.loads(re.sub(r"(?<=[:\[,\s])(-?)(inf|nan)\b", lambda m: m[1] + {"inf": "Infinity", "nan": "NaN"}[m[2]],
                             text))  # flatc writes bare inf/nan (clamp bounds), which JSON spells otherwise


def _xnnpack_constants(graph: dict):
    """(precision, elements, bytes) of every constant tensor (weights, biases) in an XNNGraph."""
    sizes = [int(c.get("size", 0)) for c in graph.get("constant_data", [])]
    for value in graph.get("xvalues", []):
        body = value.get("xvalue_union", {})
        tensor = body.get("tensor_value", body)
        index = int(tensor.get("constant_buffer_idx", 0))
        if not index:
            continue
        label = _XNN_PRECISION.get(tensor.get("datatype"), tensor.get("datatype", "?"))
        quant = body.get("quant_params", {})
        if tensor.get("datatype") == "xnn_datatype_qbint4" and quant.get("group_size"):
            label += f" {quant['group_size']}"
        stored = [index, int(quant.get("scale_buffer_idx", 0))]  # the values, and their scales where kept apart
        yield label, math.prod(int(d) for d in tensor.get("dims", [])), sum(sizes[i] for i in stored if 0 < i < len(sizes))
