"""Torch-level preparation every lowering shares: BatchNorm folding.

Folding is exact for the plan's numerics: with symmetric per-output-channel weight scales, scaling a channel by
the BatchNorm factor `a` scales its quantization step by |a| and leaves the integer weights unchanged (up to sign).

The integers and scales each lowering stores come from `hpqdeploy.core.qparams` (`quant_params`); the export form of the
quantizers (`export_form()`) lives in `hpqdeploy.core.export_form`.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from hpqdeploy.core.quantize import TensorQuant, _QuantMixin


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
