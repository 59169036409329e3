"""Running a model on its inputs, and watching chosen layers while it runs.

Every stage that measures a model (importance, MAC counts, calibration, reconstruction, attention transfer, the
lowering checks) calls it one way: keyword tensors for a Hugging Face model, one tensor otherwise. Forward hooks
are registered for one block and always removed after it, so a failed measurement never leaves a hook behind that
would change the model's later outputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn


def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's output; inputs on another device than the model's parameters are moved to it first (the
    calibration batches stay on the CPU while the model may train on a GPU)."""
    device = model_device(model)
    if device.type != "cpu":
        inputs = to_device(inputs, device)
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(value: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors (and dicts of them) on `device`; 4-D float tensors channels-last when asked."""
    if isinstance(value, dict):
        return {k: to_device(v, device, channels_last) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.to(device, non_blocking=True)
        if channels_last and value.dim() == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
    return value


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block (BatchNorm on its running statistics, no dropout); its mode is
    restored after, also when the block fails."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: Callable[[nn.Module, tuple, Any], Any]) -> Iterator[None]:
    """Call `hook(module, args, output)` after every forward call of each of `modules` while the block runs; a hook
    that returns a value replaces the module's output, as with `register_forward_hook`."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
