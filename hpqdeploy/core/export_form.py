"""The export form of the quantizers: what quantized layers and quantization points emit while a model is exported.

Within `export_form()` each quantized layer expresses its quantization with the two standard PyTorch ops that
exporters understand (`fake_quantize_per_channel_affine` for 8-bit per-channel weights, which ONNX exports as
QuantizeLinear/DequantizeLinear and OpenVINO converts to FakeQuantize; `fake_quantize_per_tensor_affine` for
static activations). Weights below 8 bits or per-group are emitted as their dequantized float values; each
runtime's lowering turns those layers into its own low-bit form, reading `bits`, `scales` and `group_size` from the
module (`qparams.quant_params`). The numbers all come from `qparams`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from hpqdeploy.core.qparams import INT8_MAX, INT8_MIN, activation_qparams, qmax, quantize_weight, weight_scales
from hpqdeploy.errors import UserError

_EXPORT: dict | None = None  # while exporting: {"symmetric": bool}
_QMAX8 = int(qmax(8))  # the narrow 8-bit range of the plan's weights: -127..127


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


def exports_int8_fake_quant(m) -> bool:
    """Whether `export_weight` writes the layer's weight as one per-channel int8 fake-quant op (uniform 8-bit,
    per-channel); other weights are emitted as their dequantized values."""
    return int(m.w_bits.min()) == int(m.w_bits.max()) == 8 and m.group_size is None


def export_weight(m) -> torch.Tensor:
    if exports_int8_fake_quant(m):
        s = weight_scales(m.weight, m.w_bits, m.w_clip, None).flatten().detach()
        w = torch.minimum(torch.maximum(m.weight, -_QMAX8 * s.view(-1, *[1] * (m.weight.dim() - 1))),
                          _QMAX8 * s.view(-1, *[1] * (m.weight.dim() - 1)))
        return torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, INT8_MIN,
                                                      INT8_MAX)
    return quantize_weight(m.weight, m.w_bits, m.w_clip, m.group_size).detach()


def export_activation(m, x: torch.Tensor) -> torch.Tensor:
    """A quantization point (or a layer's input) as one fake-quant op: Q/DQ in ONNX, FakeQuantize in OpenVINO."""
    act = int(m.act_bits)
    if not act or m.act_dynamic:
        return x
    lo, hi = (float(v) for v in (m.act_source or m).act_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError("an activation range was never calibrated; the artifact is incomplete")
    scale, zp, qmin, qmax_ = activation_qparams(lo, hi, act, _EXPORT["symmetric"])
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax_)


def export_input(m, x: torch.Tensor) -> torch.Tensor:
    """A layer's input quantizer; nothing where the layer reads a quantization point's output directly (the point
    already wrote the Q/DQ, one per tensor, as the runtimes' own quantizers place them)."""
    if m.reads_point_directly:
        return x
    return export_activation(m, x)
