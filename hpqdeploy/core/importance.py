"""Importance: which channels, heads and layers matter, measured on calibration batches.

Channel criteria (one signature, chosen by name) delegate to torch-pruning's group importance, so a channel's score
covers every layer coupled to it: `magnitude` (L2 norm of the coupled weights) and `taylor` (first-order Taylor,
|w * dL/dw|, from gradients accumulated on calibration batches). Layer sensitivity is measured, not guessed: how far
the model's predictions move (KL divergence from the unchanged model on calibration batches) when that one group
is pruned, or that one layer quantized, with everything else untouched. Unlike a loss difference on a few batches
it is never negative and barely noisy.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from hpqdeploy.errors import UserError
from hpqdeploy.hooks import evaluating, forward

CRITERIA = ("magnitude", "taylor")


def channel_criterion(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    raise UserError(f"unknown importance criterion {name!r}; choose one of {', '.join(CRITERIA)}")


def _loss(model: nn.Module, inputs, labels: torch.Tensor) -> torch.Tensor:
    logits = forward(model, inputs)
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def accumulate_gradients(model: nn.Module, batches: list) -> None:
    """Leave dL/dw summed over `batches` in every parameter's `.grad` (the Taylor criterion reads them)."""
    model.zero_grad(set_to_none=True)
    with evaluating(model):
        for inputs, labels in batches:
            _loss(model, inputs, labels).backward()


def squared_gradients(model: nn.Module, batches: list, modules: Iterable[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Empirical Fisher diagonal of each module's weight: the mean over batches of (dL/dw)^2."""
    modules = list(modules)
    fisher = {m: torch.zeros_like(m.weight) for m in modules}
    with evaluating(model):
        for inputs, labels in batches:
            model.zero_grad(set_to_none=True)
            _loss(model, inputs, labels).backward()
            for m in modules:
                if m.weight.grad is not None:
                    fisher[m] += m.weight.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {m: f / max(len(batches), 1) for m, f in fisher.items()}


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    """Log-probabilities of the unchanged model on each calibration batch (what sensitivities compare against)."""
    with evaluating(model):
        return [F.log_softmax(forward(model, inputs).float(), dim=-1) for inputs, _ in batches]


@torch.no_grad()
def output_divergence(model: nn.Module, batches: list, reference: list[torch.Tensor]) -> float:
    """Mean KL(reference || model) over the calibration examples: how far a change moves the predictions."""
    total, count = 0.0, 0
    with evaluating(model):
        for (inputs, _), ref in zip(batches, reference):
            logp = F.log_softmax(forward(model, inputs).float(), dim=-1)
            total += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            count += ref.shape[0]
    return total / max(count, 1)


def divergence_after(model: nn.Module, batches: list, reference: list[torch.Tensor],
                     change: Callable[[], Callable[[], None]]) -> float:
    """Apply `change` (which returns its own undo), measure the output divergence, undo."""
    undo = change()
    try:
        return output_divergence(model, batches, reference)
    finally:
        undo()
