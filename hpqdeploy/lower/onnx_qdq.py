"""PyTorch fake-quant model -> Q/DQ ONNX that stores the plan's own integers and scales (no fresh calibration).

Why stand-in layers instead of exporting the quantized modules as they are: under `export_form()` an 8-bit layer's
per-channel weight scales are computed inside the graph from the float weight (Abs, ReduceMax, Pow, ...), which
the TorchScript exporter does not fold, and a linear layer's weight reaches MatMul through a folded Transpose under
an anonymous name. So for the export each quantized layer is replaced by a stand-in that holds its dequantized
weight (integer x scale, exactly what the fake-quant layer computes) as one constant named `<layer>.weight`
((in, out) for linear layers, so it feeds MatMul directly), and quantizes its input with the same
`fake_quantize_per_tensor_affine` op `export_form` emits (-> QuantizeLinear/DequantizeLinear). The post-pass finds
each layer's weight by that name and writes the runtime's integer form in its place:

- 8-bit per-channel: 8-bit codes feeding DequantizeLinear (int8; for ONNX Runtime on CPUs without VNNI uint8 with
  zero point 128, the same values: see `ONNXRUNTIME`);
- weight-only linear layers (grouped 4/8-bit, or 8-bit with float inputs) on ONNX Runtime:
  `com.microsoft.MatMulNBits` (codes q + 2^(b-1), default zero point, fp32 accuracy);
- grouped 4-bit linear weights on TensorRT: opset-21 INT4 DequantizeLinear with `block_size` (weight-only);
- embeddings on ONNX Runtime: `com.microsoft.GatherBlockQuantized` (int4 blocks, or uint8 rows), so only the
  gathered rows are dequantized at run time.

The result computes, operation for operation, what the legalized PyTorch model computes (up to the rounding of
QuantizeLinear at exact ties), except where a flavor asks for other activation numerics (TensorRT: symmetric int8).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hpqdeploy.core.export_form import export_form
from hpqdeploy.core.qparams import QuantParams, activation_qparams, dequantized_weight, quant_params, unsigned_codes
from hpqdeploy.core.quantize import _QuantMixin, op_kind
from hpqdeploy.errors import UserError
from hpqdeploy.lower.torch_prep import fold_batchnorm

MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_LIMIT = 1_500_000_000  # protobuf cannot hold more than 2 GB; stay well below it


@dataclass(frozen=True)
class QdqFlavor:
    """What one runtime wants from the Q/DQ graph."""

    runtime: str
    activations: str  # "uint8": affine per tensor, as in PyTorch | "int8": symmetric, zero point 0
    weights: str  # 8-bit weight codes: "int8" (zero point 0) | "uint8" (q + 128, zero point 128: the same values)
    grouped_linear: str  # "matmulnbits" (com.microsoft, bits 4/8) | "block_dq" (opset-21 INT4 DequantizeLinear)
    embedding: str  # "gather_block" (com.microsoft GatherBlockQuantized) | "dq_gather" (int8 DQ, then Gather)
    base_opset: int = 17  # per-channel Q/DQ needs 13; 21 is used only where INT4 DequantizeLinear is written
    # static int8 linear layers: "qdq" (DQ -> MatMul -> Add) | "matmul_integer_to_float" (com.microsoft, bias
    # included: ORT fuses a 2-D DQ -> MatMul -> Add into a float Gemm before its QDQ fusions could see the MatMul)
    static_linear: str = "qdq"


# ONNX Runtime: uint8 activations, int8 weights (u8 x s8, its fastest x86 kernels: on a Xeon with VNNI 1.24x
# faster than u8 x u8 on the ResNet-20 hybrid, same outputs; bench/ort_encoding_bench.py). Without VNNI (AVX2,
# AVX-512F) those kernels sum pairs of u8 x s8 products in saturating int16, so full-range int8 weights (the plan's
# +-127) give wrong sums next to large activations; `ONNXRUNTIME_NO_VNNI` stores them as uint8 with zero point 128
# (the same values) for the exact u8 x u8 kernels (export's `--overflow-fix`).
ONNXRUNTIME = QdqFlavor("onnxruntime", activations="uint8", weights="int8", grouped_linear="matmulnbits",
                        embedding="gather_block", static_linear="matmul_integer_to_float")
ONNXRUNTIME_NO_VNNI = replace(ONNXRUNTIME, weights="uint8")
TENSORRT = QdqFlavor("tensorrt", activations="int8", weights="int8", grouped_linear="block_dq", embedding="dq_gather")


class ActQuant(NamedTuple):
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    origin: str = "the plan's affine scale and zero point (no fresh calibration)"


@dataclass
class LayerForm:
    """One quantized layer: its integers and scales, how its input is quantized, and the ONNX form chosen."""

    name: str
    kind: str  # "conv" | "linear" | "embedding" (depthwise convs are "conv" here)
    params: QuantParams
    act: ActQuant | None
    form: str  # see `_choose_form`


@dataclass
class QdqExport:
    path: Path
    files: list[Path]
    opset: int
    input_names: list[str]
    layers: dict[str, LayerForm] = field(default_factory=dict)
    folded_batchnorms: int = 0

    def notes(self) -> list[str]:
        forms = Counter(_FORM_TEXT[layer.form] for layer in self.layers.values())
        acts = Counter((_act_text(layer.act), layer.act.origin) for layer in self.layers.values() if layer.act)
        notes = [f"{n} layer(s): {text}" for text, n in sorted(forms.items())]
        notes += [f"{n} layer input(s) quantized {text}, scale: {origin}" for (text, origin), n in sorted(acts.items())]
        if self.folded_batchnorms:
            notes.append(f"{self.folded_batchnorms} BatchNorm layer(s) folded into the preceding convolution")
        notes.append(f"ONNX opset {self.opset}, dynamic batch axis")
        return notes


_FORM_TEXT = {
    "dq_int8": "8-bit per-channel weights -> DequantizeLinear",
    "matmulnbits": "weight-only (float activations) -> com.microsoft.MatMulNBits",
    "block_dq_int4": "INT4 block weights -> opset-21 DequantizeLinear (weight-only)",
    "gather_block_int4": "4-bit grouped embedding -> com.microsoft.GatherBlockQuantized",
    "gather_block_uint8": "8-bit per-row embedding -> com.microsoft.GatherBlockQuantized",
}


def _act_text(act: ActQuant) -> str:
    return "affine uint8" if act.qmin == 0 else "symmetric int8 (zero point 0)"


# --------------------------------------------------------------------------------------------------------------
# Torch side: stand-ins and export


class _StandIn(nn.Module):
    """Export-only twin of a quantized layer: its dequantized weight as one named constant, its input quantizer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: ActQuant | None):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act = act

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act
        return x if a is None else torch.fake_quantize_per_tensor_affine(x, a.scale, a.zero_point, a.qmin, a.qmax)


class _ConvStandIn(_StandIn):
    def __init__(self, conv: nn.Conv2d, weight, act):
        super().__init__(weight, conv.bias, act)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x):
        return F.conv2d(self.quantize_input(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _LinearStandIn(_StandIn):
    """Weight stored (in, out): `x @ W` exports as a MatMul whose second input is the named constant itself."""

    def forward(self, x):
        y = torch.matmul(self.quantize_input(x), self.weight)
        return y if self.bias is None else y + self.bias


class _EmbeddingStandIn(_StandIn):
    @property
    def num_embeddings(self) -> int:  # read by `SplitEmbedding`
        return self.weight.shape[0]

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def activation_quant(name: str, m: _QuantMixin, flavor: QdqFlavor) -> ActQuant | None:
    bits = int(m.act_bits)
    if not bits:
        return None
    if m.act_dynamic:
        raise UserError(f"layer {name}: dynamic (per-batch) activation quantization has no static Q/DQ form for "
                        f"{flavor.runtime}; export with --target {flavor.runtime} so legalization decides it")
    if bits != 8:
        raise UserError(f"layer {name}: {bits}-bit activations are not executable by {flavor.runtime} (8-bit only)")
    lo, hi = (float(v) for v in (m.act_source or m).act_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(f"layer {name}: activation range was never calibrated; the artifact is incomplete")
    scale, zp, qmin, qmax = activation_qparams(lo, hi, bits, symmetric=flavor.activations == "int8")
    if qmin == 0:
        return ActQuant(scale, zp, qmin, qmax)
    return ActQuant(scale, zp, qmin, qmax, "max(|lo|,|hi|)/127 from the plan's activation range (no fresh calibration)")


def _choose_form(name: str, kind: str, p: QuantParams, act: ActQuant | None, flavor: QdqFlavor) -> str:
    grouped = p.group_size is not None
    if kind == "conv" and p.bits == 8 and not grouped:
        return "dq_int8"
    if kind == "linear":
        if p.bits == 8 and not grouped:
            # weight-only 8-bit on ONNX Runtime: written as MatMulNBits at fp32 accuracy; left as DQ -> MatMul, ORT
            # would fuse it into MatMulNBits at accuracy level 4 (activations quantized per batch: other numerics)
            weight_only = act is None and flavor.grouped_linear == "matmulnbits" and _row_block(p)
            return "matmulnbits" if weight_only else "dq_int8"
        if grouped and flavor.grouped_linear == "matmulnbits" and p.bits in (4, 8):
            return "matmulnbits"
        if grouped and flavor.grouped_linear == "block_dq" and p.bits == 4:
            return "block_dq_int4"
    if kind == "embedding":
        if p.bits == 8 and not grouped:
            return "gather_block_uint8" if flavor.embedding == "gather_block" and _row_block(p) else "dq_int8"
        if p.bits == 4 and grouped and flavor.embedding == "gather_block":
            return "gather_block_int4"
    gran = f"per-group {p.group_size}" if grouped else "per-channel"
    raise UserError(f"layer {name}: {p.bits}-bit {gran} {kind} weights have no {flavor.runtime} form; "
                    f"export legalizes for --target {flavor.runtime}, so this plan was legalized for another target")


def _row_block(p: QuantParams) -> int | None:
    """MatMulNBits and GatherBlockQuantized take power-of-two blocks >= 16: the largest that divides a row (for a
    per-channel layer each block repeats its channel's scale), or None."""
    dim = p.int_weight.shape[1]
    for block in (2**k for k in range(12, 3, -1)):
        if dim % block == 0:
            return block
    return None


def swap_in_stand_ins(model: nn.Module, flavor: QdqFlavor) -> dict[str, LayerForm]:
    """Replace every quantized layer of `model` (in place) by its export stand-in; return what each became."""
    layers: dict[str, LayerForm] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, _QuantMixin):
            continue
        kind = "conv" if isinstance(m, nn.Conv2d) else op_kind(m)
        try:
            p = quant_params(m)
        except ValueError as exc:
            raise UserError(f"layer {name}: {exc}") from None
        act = activation_quant(name, m, flavor)
        form = _choose_form(name, kind, p, act, flavor)
        weight = dequantized_weight(p)
        own = None if m.reads_point_directly else act  # a point's Q/DQ right before it quantizes its input
        if kind == "conv":
            if m.padding_mode != "zeros":
                raise UserError(f"layer {name}: padding_mode={m.padding_mode!r} is not exported; use zero padding")
            new: nn.Module = _ConvStandIn(m, weight, own)
        elif kind == "linear":
            new = _LinearStandIn(weight.t(), m.bias, own)
        else:
            if m.max_norm is not None:
                raise UserError(f"layer {name}: embeddings with max_norm (renormalized rows) are not exported")
            new = _EmbeddingStandIn(weight, None, None)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        layers[name] = LayerForm(name, kind, p, act, form)
    return layers


def input_signature(model: nn.Module, example: Any) -> tuple[list[str], tuple]:
    if isinstance(example, dict):
        params = list(inspect.signature(model.forward).parameters)
        unknown = [k for k in example if k not in params]
        if unknown:
            raise UserError(f"the model's forward() takes no input named {unknown[0]!r}")
        names = [p for p in params if p in example]
        return names, tuple(example[n] for n in names)
    return ["input"], (example,)


def torch_to_onnx(model: nn.Module, args: tuple, names: list[str], opset: int, symmetric: bool = False):
    import onnx

    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in [*names, "logits"]}
    try:
        with export_form(symmetric), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=names,
                              output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; the message is what the user needs
        raise UserError(f"ONNX export failed: {str(exc).strip().splitlines()[0][:200]}") from None
    return onnx.load_from_string(buf.getvalue())


def export_qdq(model: nn.Module, example_inputs: Any, path: Path, flavor: QdqFlavor) -> QdqExport:
    """Write `path` (an .onnx file, plus `<name>.data` only if the weights exceed protobuf's limit)."""
    work = copy.deepcopy(model).eval()
    folded = fold_batchnorm(work)
    layers = swap_in_stand_ins(work, flavor)
    opset = 21 if any(layer.form == "block_dq_int4" for layer in layers.values()) else flavor.base_opset
    names, args = input_signature(work, example_inputs)
    proto = torch_to_onnx(work, args, names, opset, symmetric=flavor.activations == "int8")
    WeightWriter(proto, flavor).write(layers.values())
    files = save_onnx(proto, Path(path))
    return QdqExport(Path(path), files, opset, names, layers, folded)


def save_onnx(proto, path: Path) -> list[Path]:
    import onnx

    if proto.ByteSize() < EXTERNAL_DATA_LIMIT:
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    onnx.checker.check_model(str(path))
    return [path, data]


# --------------------------------------------------------------------------------------------------------------
# ONNX side: write each layer's integer form in place of its float constant


class WeightWriter:
    def __init__(self, proto, flavor: QdqFlavor):
        self.flavor = flavor
        self.graph = proto.graph
        self.proto = proto
        self.inits = {t.name: t for t in self.graph.initializer}
        self.dropped: set[str] = set()

    def write(self, layers) -> None:
        layers = list(layers)
        self._undo_dedup([f"{layer.name}.weight" for layer in layers])
        for layer in layers:
            getattr(self, f"_write_{layer.form}")(layer, f"{layer.name}.weight")
            if (layer.form == "dq_int8" and layer.kind == "linear" and layer.act is not None
                    and self.flavor.static_linear == "matmul_integer_to_float"):
                self._fuse_static_linear(layer, f"{layer.name}.weight")
        kept = [t for t in self.graph.initializer if t.name not in self.dropped]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        if any(n.domain == MS_DOMAIN for n in self.graph.node):
            from onnx import helper

            if not any(o.domain == MS_DOMAIN for o in self.proto.opset_import):
                self.proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    # -- graph plumbing

    def _undo_dedup(self, keys: list[str]) -> None:
        """The exporter merges equal constants and re-creates the others with Identity: give each layer its own."""
        from onnx import numpy_helper

        for node in list(self.graph.node):
            if node.op_type == "Identity" and node.output[0] in keys and node.input[0] in self.inits:
                copy_ = numpy_helper.from_array(numpy_helper.to_array(self.inits[node.input[0]]), node.output[0])
                self._add_init(copy_)
                self.graph.node.remove(node)

    def _add_init(self, tensor) -> None:
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor

    def _array(self, name, array, dtype=None):
        from onnx import numpy_helper

        self._add_init(numpy_helper.from_array(np.ascontiguousarray(array if dtype is None else array.astype(dtype)),
                                               name))
        return name

    def _take(self, key: str, layer: LayerForm) -> None:
        """Drop the float weight (from the graph at the end of `write`: one pass over the initializers)."""
        if key not in self.inits:
            raise UserError(f"layer {layer.name}: its weight did not survive the ONNX export as a constant")
        del self.inits[key]
        self.dropped.add(key)

    def _consumers(self, key: str) -> list:
        return [n for n in self.graph.node if key in n.input]

    def _only_consumed_by(self, key: str, layer: LayerForm, op: str, slot: int) -> list:
        users = self._consumers(key)
        bad = [n for n in users if n.op_type != op or list(n.input).index(key) != slot]
        if not users or bad:
            what = bad[0].op_type if bad else "nothing"
            raise UserError(f"layer {layer.name}: its weight feeds {what}, not {op} input {slot}; "
                            f"cannot write its low-bit form")
        return users

    def _replace(self, old, new) -> None:
        index = list(self.graph.node).index(old)
        self.graph.node.remove(old)
        self.graph.node.insert(index, new)

    def _dequantize(self, key, ints, scale, zero_point, **attrs) -> None:
        from onnx import helper

        inputs = [ints, scale] + ([zero_point] if zero_point else [])
        self.graph.node.insert(0, helper.make_node("DequantizeLinear", inputs, [key], name=f"{key}/dequantize",
                                                   **attrs))

    # -- the forms

    def _write_dq_int8(self, layer: LayerForm, key: str) -> None:
        self._take(key, layer)
        ints = layer.params.int_weight.numpy()
        scale = layer.params.scales.reshape(-1).numpy().astype(np.float32)
        axis = 0
        if layer.kind == "linear":  # stored (in, out): the output channel is axis 1
            ints, axis = ints.T, 1
        if self.flavor.weights == "uint8":
            codes, zero_point = unsigned_codes(ints, 8)
            zero = np.full(scale.shape, zero_point, np.uint8)
        else:
            codes, zero = ints.astype(np.int8), np.zeros(scale.shape, np.int8)
        q = self._array(f"{key}_quantized", codes)
        s = self._array(f"{key}_scale", scale)
        z = self._array(f"{key}_zero_point", zero)
        self._dequantize(key, q, s, z, axis=axis)

    def _fuse_static_linear(self, layer: LayerForm, key: str) -> None:
        """DQ(Q(x)) -> MatMul(., DQ(W)) [-> Add(bias)] as one com.microsoft.MatMulIntegerToFloat reading the
        quantized x, the integer W, both scales and zero points, and the bias: what ORT itself makes of the MatMul
        when no bias follows. Left as it is when the pattern differs (the DQ/Q of x shared, no constant bias)."""
        from onnx import helper, numpy_helper

        producer = {o: n for n in self.graph.node for o in n.output}
        weight_dq = producer.get(key)
        users = self._consumers(key)
        if weight_dq is None or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != key:
            return
        matmul = users[0]
        x_dq = producer.get(matmul.input[0])
        if x_dq is None or x_dq.op_type != "DequantizeLinear" or len(x_dq.input) < 3:
            return
        q = producer.get(x_dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return
        inputs = [x_dq.input[0], weight_dq.input[0], x_dq.input[1], weight_dq.input[1], x_dq.input[2],
                  weight_dq.input[2]]
        outputs, remove = list(matmul.output), [matmul, weight_dq]
        after = self._consumers(matmul.output[0])
        if len(after) == 1 and after[0].op_type == "Add":
            other = [i for i in after[0].input if i != matmul.output[0]]
            bias = self.inits.get(other[0]) if len(other) == 1 else None
            n = layer.params.int_weight.shape[0]
            if bias is not None and numpy_helper.to_array(bias).shape == (n,):
                inputs.append(other[0])
                outputs = list(after[0].output)
                remove.append(after[0])
        index = list(self.graph.node).index(matmul)
        self.graph.node.insert(index, helper.make_node("MatMulIntegerToFloat", inputs, outputs,
                                                       name=f"{layer.name}/MatMulIntegerToFloat", domain=MS_DOMAIN))
        for node in remove:
            self.graph.node.remove(node)
        if not self._consumers(x_dq.output[0]):
            self.graph.node.remove(x_dq)

    def _write_block_dq_int4(self, layer: LayerForm, key: str) -> None:
        """(in, out) INT4 weight, blocks of `group_size` along the input axis, scales (in / group, out), zp 0."""
        import ml_dtypes

        self._only_consumed_by(key, layer, "MatMul", 1)
        self._take(key, layer)
        p = layer.params
        q = self._array(f"{key}_quantized", p.int_weight.numpy().T, ml_dtypes.int4)
        s = self._array(f"{key}_scale", p.scales.numpy().T.astype(np.float32))
        self._dequantize(key, q, s, None, axis=0, block_size=int(p.group_size))

    def _write_matmulnbits(self, layer: LayerForm, key: str) -> None:
        from onnx import helper

        p = layer.params
        n, k = p.int_weight.shape
        block = p.group_size or _row_block(p)  # per-channel: equal blocks along K, the channel's scale repeated
        if block < 16 or block & (block - 1):
            raise UserError(f"layer {layer.name}: MatMulNBits needs a power-of-two group size >= 16, got {block}")
        users = self._only_consumed_by(key, layer, "MatMul", 1)
        self._take(key, layer)
        codes = unsigned_codes(p.int_weight.numpy(), p.bits)[0].reshape(n, k // block, block)
        if p.bits == 4:  # two codes per byte along K, low nibble first
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales = np.broadcast_to(p.scales.numpy(), (n, k // block)) if p.group_size is None else p.scales.numpy()
        b = self._array(f"{key}_nbits", codes)
        s = self._array(f"{key}_scales", scales.reshape(-1).astype(np.float32))
        for node in users:  # accuracy_level 1: float activations, as the plan runs them
            self._replace(node, helper.make_node(
                "MatMulNBits", [node.input[0], b, s], list(node.output), name=f"{layer.name}/MatMulNBits",
                domain=MS_DOMAIN, K=k, N=n, bits=p.bits, block_size=block, accuracy_level=1))

    def _write_gather_block_int4(self, layer: LayerForm, key: str) -> None:
        import ml_dtypes

        p = layer.params
        q = p.int_weight.numpy().astype(ml_dtypes.int4)  # int4 data: default zero point 0
        self._gather_block(layer, key, q, p.scales.numpy(), int(p.group_size), bits=4)

    def _write_gather_block_uint8(self, layer: LayerForm, key: str) -> None:
        p = layer.params
        block = _row_block(p)
        codes, _ = unsigned_codes(p.int_weight.numpy(), 8)  # uint8 data: the default zero point, 128
        scales = np.repeat(p.scales.numpy().reshape(-1, 1), codes.shape[1] // block, axis=1)
        self._gather_block(layer, key, codes, scales, block, bits=8)

    def _gather_block(self, layer, key, data, scales, block, bits) -> None:
        from onnx import helper

        users = self._only_consumed_by(key, layer, "Gather", 0)
        if any(a.name == "axis" and a.i != 0 for n in users for a in n.attribute):
            raise UserError(f"layer {layer.name}: embedding gathered along an axis other than 0")
        self._take(key, layer)
        d = self._array(f"{key}_quantized", data)
        s = self._array(f"{key}_scales", scales.astype(np.float32))
        for node in users:
            self._replace(node, helper.make_node(
                "GatherBlockQuantized", [d, node.input[1], s], list(node.output),
                name=f"{layer.name}/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                block_size=block, bits=bits))


# --------------------------------------------------------------------------------------------------------------
# Reading an ONNX file back


def dtype_name(elem_type: int) -> str:
    """"float32", "int8", "uint8", "int4", "int64", ... as numpy (and ml_dtypes) name them."""
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def constants(graph) -> dict:
    """Every constant tensor of the graph by name: initializers and the values of Constant nodes."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def inspect_onnx(path: Path) -> dict:
    """Ops, weight precisions and quantized compute ops, read from the file (not from the plan)."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    special: dict[str, tuple[str, int]] = {}  # packed initializers of contrib ops -> (label, logical elements)
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            special[n.input[1]] = (f"uint{_attr(n, 'bits', 4)} (MatMulNBits)", _attr(n, "K") * _attr(n, "N"))
        elif n.op_type == "GatherBlockQuantized" and inits.get(n.input[0]) is not None:
            t = inits[n.input[0]]
            count = math.prod(t.dims)
            bits = _attr(n, "bits", 4)
            if t.data_type == onnx.TensorProto.UINT8:
                label = f"uint{bits} (GatherBlockQuantized)"
                count = count * 8 // bits
            else:
                label = f"{dtype_name(t.data_type)} (GatherBlockQuantized)"
            special[t.name] = (label, count)
    weights: Counter = Counter()
    for t in graph.initializer:
        label, count = special.get(t.name, (dtype_name(t.data_type), math.prod(t.dims)))
        weights[label] += count
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph.node)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"ops": dict(sorted(ops.items())), "weights": dict(sorted(weights.items())),
            "opset": opsets.get("ai.onnx"), "opset_imports": opsets,
            "quantized_ops": dict(sorted(quantized_ops(graph, constants(graph)).items())),
            "bytes": Path(path).stat().st_size}


def quantized_ops(graph, consts) -> Counter:
    """Compute ops keyed by "<op> w:<weight precision> a:<input precision>" (float where no DequantizeLinear feeds)."""
    producer = {out: n for n in graph.node for out in n.output}

    def precision(tensor: str) -> str:
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return "float"
        src = dq.input[0]
        if src in consts:
            block = _attr(dq, "block_size", 0)
            return dtype_name(consts[src].data_type) + (f"/block{block}" if block else "")
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            if len(q.input) > 2 and q.input[2] in consts:
                return dtype_name(consts[q.input[2]].data_type)
            return "uint8"
        return "quantized"

    out: Counter = Counter()
    for n in graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            out[f"{n.op_type} w:{precision(n.input[1])} a:{precision(n.input[0])}"] += 1
        elif n.op_type == "Gather" and precision(n.input[0]) != "float":
            out[f"Gather w:{precision(n.input[0])}"] += 1
        elif n.op_type == "MatMulIntegerToFloat" and n.input[1] in consts:
            a = producer.get(n.input[0])
            a_kind = dtype_name(consts[n.input[4]].data_type) if len(n.input) > 4 and n.input[4] in consts else "int"
            out[f"MatMulIntegerToFloat w:{dtype_name(consts[n.input[1]].data_type)} a:{a_kind}"
                + ("" if a is None or a.op_type == "QuantizeLinear" else "?")] += 1
        elif n.op_type == "MatMulNBits":
            out[f"MatMulNBits w:uint{_attr(n, 'bits', 4)}/block{_attr(n, 'block_size')} a:float"] += 1
        elif n.op_type == "GatherBlockQuantized":
            t = consts.get(n.input[0])
            kind = dtype_name(t.data_type) if t is not None else "?"
            if kind == "uint8":
                kind = f"uint{_attr(n, 'bits', 4)}"
            out[f"GatherBlockQuantized w:{kind}/block{_attr(n, 'block_size')}"] += 1
    return out
