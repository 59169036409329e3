"""Read an ExecuTorch `.pte` back: kernel and delegate calls, and every constant tensor with its stored precision
(inside XNNPACK delegates, decoded with the delegate's own flatbuffer schema; outside them, e.g. quantized
embedding tables). What `export` reports as the artifact's contents comes from here, not from the plan."""

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

from hpqdeploy.errors import UserError

_XNN_PRECISION = {"xnn_datatype_qcint8": "int8 per-channel", "xnn_datatype_qcint4": "int4 per-channel",
                  "xnn_datatype_qbint4": "int4 per-group", "xnn_datatype_qint8": "int8 per-tensor",
                  "xnn_datatype_qint32": "int32 (bias)", "xnn_datatype_qcint32": "int32 (bias)",
                  "xnn_datatype_fp32": "float32", "xnn_datatype_fp16": "float16", "xnn_datatype_bf16": "bfloat16"}
_NUMPY = {"xnn_datatype_qcint8": np.int8, "xnn_datatype_qint8": np.int8, "xnn_datatype_qint32": np.int32,
          "xnn_datatype_qcint32": np.int32, "xnn_datatype_fp32": np.float32, "xnn_datatype_fp16": np.float16}
_SCALAR_TYPES = {"FLOAT": "float32", "HALF": "float16", "BFLOAT16": "bfloat16", "CHAR": "int8", "BYTE": "uint8",
                 "INT": "int32", "LONG": "int64", "BOOL": "bool"}

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


_XNN_WEIGHTED = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNFullyConnected")


def xnnpack_fast_path(path: Path) -> dict:
    """Every convolution and fully-connected node inside the XNNPACK delegates of one `.pte`, by the datatypes of
    its input and filter: a quantized filter read with a quantized input (static qint8, or dynamic qdint8) runs in
    XNNPACK's integer kernels; a quantized filter with a float input would be dequantized (a fallback). Weighted ops
    left outside the delegates run in ExecuTorch's portable float kernels."""
    data, pte = _deserialize(path)
    by_kind: Counter = Counter()
    floating = []
    quantized = 0
    for graph, _payload in _xnnpack_graphs(data, pte):
        dtypes = {}
        for v in graph.get("xvalues", []):
            u = v["xvalue_union"]
            u = u.get("tensor_value", u)  # quantized values wrap the tensor value with their parameters
            dtypes[u.get("id_out")] = u.get("datatype", "").removeprefix("xnn_datatype_")
        for i, node in enumerate(graph.get("xnodes", [])):
            kind = node["xnode_union_type"]
            if kind not in _XNN_WEIGHTED:
                continue
            u = node["xnode_union"]
            x, w = dtypes.get(u.get("input1_id")), dtypes.get(u.get("filter_id"))
            by_kind[f"{kind} in:{x} filter:{w}"] += 1
            if w not in ("fp32", "fp16", "bf16"):
                quantized += 1
                if x in ("fp32", "fp16", "bf16"):
                    floating.append(f"{kind} #{i} (float input, {w} filter)")
    from executorch.exir.schema import KernelCall

    kernels = Counter()
    for plan in pte.program.execution_plan:
        for chain in plan.chains:
            for ins in chain.instructions:
                call = ins.instr_args
                if isinstance(call, KernelCall):
                    name = plan.operators[call.op_index].name
                    if name in ("aten::convolution", "aten::linear", "aten::addmm", "aten::mm"):
                        kernels[name] += 1
    floating += [f"{name} outside the delegate (x{n})" for name, n in kernels.items()]
    return {"quantized": quantized, "integer": quantized - sum(1 for f in floating if "#" in f), "float": floating,
            "by_kind": dict(by_kind)}


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
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"{path} is not a readable ExecuTorch program: {first}") from None


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
