"""Adaptive bit allocation: which output channels (neurons, filters, embedding rows) get the low bit width.

A layer's measured sensitivity (output divergence when it alone is quantized to the low bit width) is spread over its
channels in proportion to each channel's extra error at low bits, weighted by the empirical Fisher (criterion
`taylor`) or unweighted (`magnitude`). Channels are taken cheapest-first per weight, in blocks of the target's
channel multiple (so an 8-bit and a 4-bit part of a layer stay aligned), until the low-bit share of all quantized
weights reaches the budget. Layers whose op the target cannot run at the low bit width stay high.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hpqdeploy.core.importance import divergence_after, reference_outputs, squared_gradients
from hpqdeploy.core.qparams import quantize_weight
from hpqdeploy.core.quantize import op_kind, quantizable_layers, search_clip
from hpqdeploy.core.targets import Target
from hpqdeploy.errors import UserError


@dataclass
class LayerBits:
    bits: torch.Tensor  # int per output channel
    group_size: int | None
    act_bits: int | None
    sensitivity: float | None  # output KL divergence with the whole layer at the low bit width
    act_dynamic: bool = False  # activations quantized per batch (the target's mode for low-bit weights)

    def to_json(self) -> dict:
        """Plain data: the bit widths as runs, {"bits": b, "channels": [...]} per width present."""
        return {"bits": bit_runs(self.bits.tolist()),
                "out_channels": int(self.bits.numel()), "group_size": self.group_size, "act_bits": self.act_bits,
                "act_dynamic": self.act_dynamic, "sensitivity": self.sensitivity}

    @classmethod
    def from_json(cls, blob: dict) -> "LayerBits":
        return cls(bits_from_runs(blob["bits"], int(blob["out_channels"])), blob.get("group_size"), blob.get("act_bits"), blob.get("sensitivity"),
                   bool(blob.get("act_dynamic", False)))


def bit_runs(bits: list[int]) -> list[dict]:
    """Bit widths per output channel as runs: {"bits": b, "channels": [...]} for each width present."""
    out: dict[int, list[int]] = {}
    for i, b in enumerate(bits):
        out.setdefault(int(b), []).append(i)
    return [{"bits": b, "channels": ch} for b, ch in sorted(out.items(), reverse=True)]


def bits_from_runs(runs: list[dict], out_channels: int) -> torch.Tensor:
    bits = torch.zeros(out_channels, dtype=torch.int8)
    for r in runs:
        bits[r["channels"]] = int(r["bits"])
    if (bits == 0).any():
        raise ValueError("a channel has no bit width")
    return bits


def _layer_precisions(kind: str, target: Target, requested: tuple[int, ...]) -> tuple[int, ...]:
    allowed = tuple(b for b in requested if b in target.support(kind).weight_bits)
    if not allowed:
        raise UserError(f"no requested bit width {list(requested)} is executed by {target.name} for {kind} layers "
                        f"(it runs {list(target.support(kind).weight_bits)}); add one of those to --bits")
    return allowed


def check_bits(bits: tuple[int, ...]) -> None:
    if not bits or any(b not in range(2, 9) for b in bits):
        raise UserError(f"--bits must be weight bit widths between 2 and 8, got {list(bits)}")
    if len(set(bits)) > 2:
        raise UserError(f"--bits takes one or two widths (the important channels' and the others'), got {list(bits)}")


def plan_bits(model: nn.Module, calib: list, target: Target, bits: tuple[int, ...], low_share: float,
              criterion: str, act_bits: int | None = 8) -> dict[str, LayerBits]:
    check_bits(bits)
    if not 0.0 <= low_share <= 1.0:
        raise UserError(f"--low-bit-share must be within [0, 1], got {low_share}")
    high, low = max(bits), min(bits)
    layers = quantizable_layers(model)
    precisions = {n: _layer_precisions(op_kind(m), target, bits) for n, m in layers.items()}
    plan = {}
    for n, m in layers.items():
        kind = op_kind(m)
        layer_high = max(precisions[n])
        support = target.support(kind)
        act = act_bits if (act_bits and act_bits in support.activation_bits) else None
        plan[n] = LayerBits(torch.full((m.weight.shape[0],), layer_high, dtype=torch.int8),
                            support.group_size_for(layer_high), act, None)
    eligible = {n: m for n, m in layers.items() if low in precisions[n] and low < high
                and _fits_groups(m, target.support(op_kind(m)).group_size_for(low))}
    if not eligible or low_share == 0:
        return plan
    fisher = squared_gradients(model, calib, eligible.values()) if criterion == "taylor" \
        else {m: torch.ones_like(m.weight) for m in eligible.values()}
    reference = reference_outputs(model, calib)
    chunks = []  # (cost per weight, layer name, channel indices, weight count)
    for n, m in eligible.items():
        group = target.support(op_kind(m)).group_size_for(low)
        w = m.weight.detach()
        out = w.shape[0]
        lows = torch.full((out,), low)
        low_w = quantize_weight(w, lows, search_clip(w, lows, group), group)
        plan[n].sensitivity = divergence_after(model, calib, reference, _swap_weight(m, low_w))
        highs = torch.full((out,), high)
        high_w = quantize_weight(w, highs, torch.ones(out), plan[n].group_size)
        f = fisher[m]
        extra = (((low_w - w) ** 2 - (high_w - w) ** 2) * f).reshape(out, -1).sum(1).clamp(min=0)
        row_cost = plan[n].sensitivity * extra / extra.sum().clamp(min=1e-20)
        order = torch.argsort(row_cost)
        per_row = w[0].numel()
        block = max(1, target.channel_multiple)
        for start in range(0, out - out % block if out >= block else out, block):
            idx = order[start : start + block]
            chunks.append((float(row_cost[idx].sum()) / (len(idx) * per_row), n, idx, len(idx) * per_row))
    total = sum(m.weight.numel() for m in layers.values())
    budget = low_share * total
    chosen = 0
    for cost, n, idx, count in sorted(chunks, key=lambda c: c[0]):
        if chosen >= budget:
            break
        plan[n].bits[idx] = low
        chosen += count
    for n in eligible:
        if (plan[n].bits == low).any():
            support = target.support(op_kind(layers[n]))
            plan[n].group_size = support.group_size_for(low) or plan[n].group_size
            if plan[n].act_bits and support.low_bit_activations == "float":
                plan[n].act_bits = None
            plan[n].act_dynamic = bool(plan[n].act_bits) and support.low_bit_activations == "dynamic"
    return plan


def _fits_groups(m: nn.Module, group: int | None) -> bool:
    return group is None or (m.weight[0].numel() % group == 0)


def _swap_weight(module: nn.Module, new: torch.Tensor):
    def change():
        old = module.weight.data
        module.weight.data = new

        def undo():
            module.weight.data = old

        return undo

    return change


def low_bit_share(plan: dict[str, LayerBits], model: nn.Module, low: int) -> float:
    """Share of all quantized weights stored at `low` bits."""
    layers = quantizable_layers(model)
    num = sum(int((lb.bits == low).sum()) * layers[n].weight[0].numel() for n, lb in plan.items())
    return num / max(sum(m.weight.numel() for m in layers.values()), 1)
