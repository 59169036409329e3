"""Torch-level preparation every lowering shares: BatchNorm folding and an export form of the quantizers.

Folding is exact for the plan's numerics: with symmetric per-output-channel weight scales, scaling a channel by
the BatchNorm factor `a` scales its quantization step by |a| and leaves the integer weights unchanged (up to sign).

`export_form(model)` makes each quantized layer express its quantization with the two standard PyTorch ops that
exporters understand (`fake_quantize_per_channel_affine` for 8-bit per-channel weights, which ONNX exports as
QuantizeLinear/DequantizeLinear and OpenVINO converts to FakeQuantize; `fake_quantize_per_tensor_affine` for
static activations). Weights below 8 bits or per-group are emitted as their dequantized float values; each
runtime's lowering turns those layers into its own low-bit form, reading `bits`, `scales` and `group_size` from the
module (`quant_params`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from hpqdeploy.errors import UserError
from hpqdeploy.quantize import TensorQuant, _ActObserver, _QuantMixin, qmax, quantize_weight, weight_scales


class _LeafTracer(torch.fx.Tracer):
    """Keep quantized layers as single nodes (fx would otherwise trace into them: they live outside torch.nn)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_QuantMixin, TensorQuant)) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d (sole user) into it; return how many were folded."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # not traceable (e.g. transformers): such models have no conv+BN pairs to fold
        return 0
    modules = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                and isinstance(modules.get(prev.target), nn.Conv2d) and len(prev.users) == 1):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(a.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * a + bn.bias
        conv.bias = nn.Parameter(new_bias)
        parent, _, attr = node.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        folded += 1
    return folded


@dataclass
class QuantParams:
    bits: int  # uniform after legalization
    group_size: int | None
    scales: torch.Tensor  # (out, n_groups)
    int_weight: torch.Tensor  # int8 tensor, same shape as the weight
    act_bits: int | None
    act_dynamic: bool
    act_scale: float | None  # affine uint8 activation quantization (static only)
    act_zero_point: int | None


def activation_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """Affine (asymmetric, unsigned) scale and zero point, exactly as `quantize.fake_quant_activation`."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = max((hi - lo) / levels, 1e-8)
    zero_point = int(min(max(round(-lo / scale), 0), levels))
    return float(torch.tensor(scale, dtype=torch.float32)), zero_point


@torch.no_grad()
def quant_params(m: _QuantMixin) -> QuantParams:
    bits = sorted(set(m.w_bits.tolist()))
    if len(bits) != 1:
        raise ValueError("layer still mixes bit widths: legalize (split or layer) before lowering")
    w = m.weight.detach()
    s = weight_scales(w, m.w_bits, m.w_clip, m.group_size).squeeze(-1)
    q = qmax(m.w_bits).view(-1, 1, 1)
    flat = w.reshape(w.shape[0], -1)
    g = m.group_size or flat.shape[1]
    ints = torch.clamp(torch.round(flat.view(flat.shape[0], -1, g) / s.unsqueeze(-1)), -q, q).to(torch.int8)
    act = int(m.act_bits) or None
    scale = zp = None
    if act and not m.act_dynamic:
        scale, zp = activation_qparams(float(m.act_range[0]), float(m.act_range[1]), act)
    return QuantParams(bits[0], m.group_size, s, ints.view_as(w), act, m.act_dynamic, scale, zp)


_EXPORT: dict | None = None  # while exporting: {"symmetric": bool}


@contextlib.contextmanager
def export_form(symmetric: bool = False):
    """Within this context quantized layers and quantization points emit standard fake-quant ops instead of the
    training form; `symmetric` writes activations as symmetric int8 (zero point 0, scale max(|lo|, |hi|) / 127),
    the form TensorRT takes, instead of the plan's affine uint8."""
    global _EXPORT
    previous, _EXPORT = _EXPORT, {"symmetric": symmetric}
    try:
        yield
    finally:
        _EXPORT = previous


def exporting() -> bool:
    return _EXPORT is not None


def export_weight(m: _QuantMixin) -> torch.Tensor:
    p_bits = int(m.w_bits.max())
    if p_bits == 8 and m.group_size is None and int(m.w_bits.min()) == 8:
        s = weight_scales(m.weight, m.w_bits, m.w_clip, None).flatten().detach()
        w = torch.minimum(torch.maximum(m.weight, -127 * s.view(-1, *[1] * (m.weight.dim() - 1))),
                          127 * s.view(-1, *[1] * (m.weight.dim() - 1)))
        return torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, -128, 127)
    return quantize_weight(m.weight, m.w_bits, m.w_clip, m.group_size).detach()


def export_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int, int, int]:
    """(scale, zero point, qmin, qmax) of an activation range in the exported graph."""
    if symmetric:
        return float(np.float32(max(max(abs(lo), abs(hi)) / 127.0, 1e-8))), 0, -128, 127
    scale, zp = activation_qparams(lo, hi, bits)
    return scale, zp, 0, 2**bits - 1


def export_activation(m: _ActObserver, x: torch.Tensor) -> torch.Tensor:
    """A quantization point (or a layer's input) as one fake-quant op: Q/DQ in ONNX, FakeQuantize in OpenVINO."""
    act = int(m.act_bits)
    if not act or m.act_dynamic:
        return x
    lo, hi = (float(v) for v in (m.act_source or m).act_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError("an activation range was never calibrated; the artifact is incomplete")
    scale, zp, qmin, qmax_ = export_qparams(lo, hi, act, _EXPORT["symmetric"])
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax_)


def export_input(m: _QuantMixin, x: torch.Tensor) -> torch.Tensor:
    """A layer's input quantizer; nothing where the layer reads a quantization point's output directly (the point
    already wrote the Q/DQ, one per tensor, as the runtimes' own quantizers place them)."""
    if m.reads_point_directly:
        return x
    return export_activation(m, x)
