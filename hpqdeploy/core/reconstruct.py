"""Layer-wise least-squares reconstruction after structured pruning (He et al. 2017, "Channel Pruning"; ThiNet).

Removing channels at once leaves every layer that read them computing from fewer inputs. Each such layer is
re-fitted on calibration data so that, from the inputs the pruned model really gives it, it reproduces the original
layer's output on the channels it keeps: one ridge regression per layer, no gradient steps. Layers are visited in
the order the forward pass calls them, so each also absorbs the error left by those before it. Fine-tuning then
starts from a model close to the original instead of recovering from the cut.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpqdeploy.core.prune import GroupDecision, removed_outputs
from hpqdeploy.hooks import forward, forward_hooks


def _call_order(model: nn.Module, inputs: Any) -> list[str]:
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    order: list[str] = []
    with forward_hooks(names, lambda m, _i, _o: order.append(names[m])):
        forward(model, inputs)
    return list(dict.fromkeys(order))


def _capture(model: nn.Module, module: nn.Module, inputs: Any, output: bool) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    with forward_hooks([module], lambda _m, args, out: seen.append(out if output else args[0])):
        forward(model, inputs)
    return seen[0]


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as regression rows: unfolded patches for a convolution, tokens for a linear layer."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N, C*kh*kw, L
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        x = x.reshape(-1, x.shape[-1])
    if layer.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return x.double()


def _targets(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    return y.reshape(-1, y.shape[-1]).double()


def _refittable(layer: nn.Module, original: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return (layer.groups == 1 and layer.padding_mode == "zeros" and layer.in_channels < original.in_channels)
    return isinstance(layer, nn.Linear) and layer.in_features < original.in_features


@torch.no_grad()
def reconstruct(pruned: nn.Module, original: nn.Module, example_inputs: Any, decisions: list[GroupDecision],
                calib: list, ridge: float = 1e-3) -> dict[str, dict[str, float]]:
    """Re-fit, in place, every convolution and linear layer of `pruned` that lost inputs. Returns per layer the
    relative error of its output against the original's before and after."""
    removed = removed_outputs(original, example_inputs, decisions)
    was = pruned.training, original.training
    pruned.eval()
    original.eval()
    report = {}
    layers, originals = dict(pruned.named_modules()), dict(original.named_modules())
    for name in _call_order(pruned, calib[0][0]):
        layer, ref = layers[name], originals[name]
        if not _refittable(layer, ref):
            continue
        keep = torch.ones(ref.weight.shape[0], dtype=torch.bool)
        keep[removed.get(ref, [])] = False  # the original layer's outputs the pruned one still has
        xtx = xty = None
        yy = 0.0
        for inputs, _ in calib:
            x = _rows(layer, _capture(pruned, layer, inputs, output=False))
            y = _targets(ref, _capture(original, ref, inputs, output=True))[:, keep]
            xtx = x.T @ x if xtx is None else xtx + x.T @ x
            xty = x.T @ y if xty is None else xty + x.T @ y
            yy += y.pow(2).sum().item()

        def error(w: torch.Tensor) -> float:  # ||X w - Y|| / ||Y|| from the accumulated products
            return max((w * (xtx @ w)).sum().item() - 2 * (w * xty).sum().item() + yy, 0.0) ** 0.5 / yy ** 0.5

        current = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        if layer.bias is not None:
            current = torch.cat([current, layer.bias.detach().double()[:, None]], dim=1)
        lam = ridge * xtx.diagonal().mean()
        fitted = torch.linalg.solve(xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty)  # D, C_out
        report[name] = {"error_before": error(current.T), "error_after": error(fitted)}
        fitted = fitted.T
        if layer.bias is not None:
            layer.bias.copy_(fitted[:, -1].to(layer.bias.dtype))
            fitted = fitted[:, :-1]
        layer.weight.copy_(fitted.reshape(layer.weight.shape).to(layer.weight.dtype))
    pruned.train(was[0])
    original.train(was[1])
    return report
