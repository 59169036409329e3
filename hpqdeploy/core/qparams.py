"""The plan's quantization as numbers: integer weights with their scales, activation scales and zero points.

This is the one place they are computed. The fake-quant model (`quantize`) computes with these functions, and every
lowering stores what they return in its runtime's form, so PyTorch and the runtimes hold the same integers and
scales, bit for bit.

Weights: symmetric, zero point 0, narrow range [-qmax, qmax] with qmax = 2^(b-1) - 1 (at least 1), a bit width per
output channel, one scale per output channel or per group of `group_size` consecutive inputs within it:
scale = clip x max|w| / qmax, integer = clamp(round(w / scale), -qmax, qmax).

Activations, per tensor, from a calibrated range [lo, hi]: affine unsigned (the plan's numerics; the range widened
to hold 0, scale (hi - lo) / (2^b - 1), zero point round(-lo / scale), computed in float32 as the fake-quant model
computes them), or symmetric int8 (TensorRT's: zero point 0, scale max(|lo|, |hi|) / 127).

A layer here is a quantized module of `quantize` (`w_bits`, `w_clip`, `group_size`, `act_bits`, `act_range`, ...),
read by attribute only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

INT8_MIN, INT8_MAX = -128, 127  # int8 storage; symmetric activations divide their range by INT8_MAX
ACT_SCALE_MIN = 1e-8  # an activation range of zero width still gets a usable step
_AMAX_MIN = 1e-12  # an all-zero channel or group still gets a positive weight scale


# --------------------------------------------------------------------------------------------------------------
# Weights


def qmax(bits: torch.Tensor | int) -> torch.Tensor:
    """The top integer level of the symmetric narrow range of each bit width (float, at least 1)."""
    bits = bits if isinstance(bits, torch.Tensor) else torch.tensor(bits)
    return (2 ** (bits.float() - 1) - 1).clamp(min=1)


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`w` viewed as (out, n_groups, group): each output channel's inputs in groups of `group_size` (one group when
    None)."""
    flat = w.reshape(w.shape[0], -1)
    g = group_size or flat.shape[1]
    return flat.view(flat.shape[0], flat.shape[1] // g, g)


def weight_scales(w: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Scales of shape (out, n_groups, 1) for `w` viewed as (out, n_groups, group)."""
    amax = grouped(w, group_size).abs().amax(dim=2, keepdim=True).clamp(min=_AMAX_MIN)
    return amax * clip.view(-1, 1, 1) / qmax(bits).view(-1, 1, 1)


def integer_weight(w: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor, group_size: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer weights, as floats of shape (out, n_groups, group), and their scales (out, n_groups, 1)."""
    s = weight_scales(w, bits, clip, group_size)
    q = qmax(bits).view(-1, 1, 1)
    return torch.clamp(torch.round(grouped(w, group_size) / s), -q, q), s


def quantize_weight(w: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The dequantized weight the runtime will see (integer x scale, no gradient trick)."""
    ints, s = integer_weight(w, bits, clip, group_size)
    return (ints * s).view_as(w)


def unsigned_codes(ints: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Signed integer weights as unsigned codes q + 2^(b-1) (uint8) and the zero point 2^(b-1) that gives back the
    same values: the storage of runtimes that take unsigned weights."""
    zero_point = 1 << (bits - 1)
    return (ints.astype(np.int16) + zero_point).astype(np.uint8), zero_point


# --------------------------------------------------------------------------------------------------------------
# Activations


class ActivationQParams(NamedTuple):
    """The arguments of one per-tensor fake-quant (or QuantizeLinear/DequantizeLinear pair)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


def _as_float32(v: torch.Tensor | float) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float32)


def activation_affine(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int = 8) -> tuple[float, int]:
    """Affine (asymmetric, unsigned) scale and zero point of the range [lo, hi], widened to hold 0. Computed in the
    tensors' dtype (float32: calibrated ranges are float32 buffers); plain numbers are taken as float32."""
    lo, hi = _as_float32(lo), _as_float32(hi)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    levels = 2**bits - 1
    scale = float(((hi - lo) / levels).clamp(min=ACT_SCALE_MIN))
    zero_point = int(torch.clamp(torch.round(-lo / scale), 0, levels))
    return scale, zero_point


def activation_symmetric(lo: torch.Tensor | float, hi: torch.Tensor | float) -> tuple[float, int]:
    """Symmetric int8 scale max(|lo|, |hi|) / 127 (rounded once to float32) and zero point 0: TensorRT's form."""
    lo, hi = float(lo), float(hi)
    return float(np.float32(max(max(abs(lo), abs(hi)) / INT8_MAX, ACT_SCALE_MIN))), 0


def activation_qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int = 8, symmetric: bool = False
                       ) -> ActivationQParams:
    """Scale, zero point and integer range of an activation range: affine unsigned `bits`-bit (the plan's), or
    symmetric int8 when `symmetric`."""
    if symmetric:
        scale, zero_point = activation_symmetric(lo, hi)
        return ActivationQParams(scale, zero_point, INT8_MIN, INT8_MAX)
    scale, zero_point = activation_affine(lo, hi, bits)
    return ActivationQParams(scale, zero_point, 0, 2**bits - 1)


# --------------------------------------------------------------------------------------------------------------
# A layer


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


@torch.no_grad()
def quant_params(m) -> QuantParams:
    """The integer weights, scales and input quantization of a quantized layer whose channels share one width."""
    bits = sorted(set(m.w_bits.tolist()))
    if len(bits) != 1:
        raise ValueError("layer still mixes bit widths: legalize (split or layer) before lowering")
    w = m.weight.detach()
    ints, s = integer_weight(w, m.w_bits, m.w_clip, m.group_size)
    act = int(m.act_bits) or None
    scale = zp = None
    if act and not m.act_dynamic:
        scale, zp = activation_affine(m.act_range[0], m.act_range[1], act)
    return QuantParams(bits[0], m.group_size, s.squeeze(-1), ints.to(torch.int8).view_as(w), act, m.act_dynamic,
                       scale, zp)


def dequantized_weight(p: QuantParams) -> torch.Tensor:
    """integer x scale, group by group, in the weight's shape: bit-identical to `quantize_weight`."""
    ints = p.int_weight.float()
    return (ints.reshape(ints.shape[0], p.scales.shape[1], -1) * p.scales.reshape(ints.shape[0], -1, 1)).view_as(ints)


def weight_bound(p: QuantParams) -> torch.Tensor:
    """The largest magnitude each weight element can take (qmax x its scale), in the weight's shape: the range the
    plan clips a float weight to."""
    per_group = p.int_weight[0].numel() // p.scales.shape[1]
    return (p.scales.repeat_interleave(per_group, dim=1) * qmax(p.bits)).view_as(p.int_weight)
