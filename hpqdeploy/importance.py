"""Importance: which channels, heads and layers matter, measured on calibration batches.

Channel criteria (one signature, chosen by name) delegate to torch-pruning's group importance, so a channel's score
covers every layer coupled to it: `magnitude` (L2 norm of the coupled weights) and `taylor` (first-order Taylor,
|w * dL/dw|, from gradients accumulated on calibration batches). Layer sensitivity is measured, not guessed: the
loss change when that one group is pruned, or that one layer quantized, with everything else untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from hpqdeploy.errors import UserError

CRITERIA = ("magnitude", "taylor")


def channel_criterion(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    raise UserError(f"unknown importance criterion {name!r}; choose one of {', '.join(CRITERIA)}")


def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def accumulate_gradients(model: nn.Module, batches: list) -> None:
    """Leave dL/dw summed over `batches` in every parameter's `.grad` (the Taylor criterion reads them)."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    for inputs, labels in batches:
        F.cross_entropy(forward(model, inputs), labels).backward()
    model.train(was_training)


def squared_gradients(model: nn.Module, batches: list, modules: Iterable[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Empirical Fisher diagonal of each module's weight: the mean over batches of (dL/dw)^2."""
    modules = list(modules)
    fisher = {m: torch.zeros_like(m.weight) for m in modules}
    model.eval()
    for inputs, labels in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(model, inputs), labels).backward()
        for m in modules:
            if m.weight.grad is not None:
                fisher[m] += m.weight.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {m: f / max(len(batches), 1) for m, f in fisher.items()}


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, labels in batches:
        total += F.cross_entropy(forward(model, inputs), labels, reduction="sum").item()
        count += labels.numel()
    model.train(was_training)
    return total / max(count, 1)


def loss_increase(model: nn.Module, batches: list, base_loss: float, change: Callable[[], Callable[[], None]]) -> float:
    """Apply `change` (which returns its own undo), measure the calibration loss, undo; return the increase."""
    undo = change()
    try:
        return mean_loss(model, batches) - base_loss
    finally:
        undo()
