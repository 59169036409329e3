"""Size and cost of a model: parameters, MACs, and weight bytes at the plan's bit widths."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from hpqdeploy.core.quantize import _QuantMixin


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_breakdown(model: nn.Module) -> dict[str, int] | None:
    """Parameters per part of a transformer classifier (embeddings, encoder, pooler, classifier); None otherwise."""
    hf = getattr(model, "hf", None)
    if hf is None:
        return None
    base = hf.base_model
    parts = {name: count_params(child) for name, child in base.named_children()}
    parts["head"] = count_params(hf) - count_params(base)
    return parts


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of convolutions and linear layers (torch-pruning's counter; attention matmuls are not counted)."""
    import contextlib
    import io

    import torch_pruning as tp

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning per module for keyword-only inputs
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs)


def weight_bytes(model: nn.Module) -> dict:
    """Bytes to store the weights: quantized tensors at their bit widths plus one fp32 scale per channel or group;
    everything else (biases, norms, unquantized layers) at fp32."""
    quant_bits = 0
    scale_bytes = 0
    float_params = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, _QuantMixin):
            per_row = m.weight[0].numel()
            quant_bits += int(m.w_bits.long().sum()) * per_row
            groups = per_row // m.group_size if m.group_size else 1
            scale_bytes += 4 * m.weight.shape[0] * groups + (8 if int(m.act_bits) else 0)
            seen.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in seen:
            float_params += p.numel()
    total = quant_bits // 8 + scale_bytes + 4 * float_params
    return {"total": total, "quantized_weights": quant_bits // 8, "scales": scale_bytes, "float": 4 * float_params}
