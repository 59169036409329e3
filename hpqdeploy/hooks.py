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
    device = next((p.device for p in model.parameters()), None)
    if device is not None and device.type != "cpu":
        inputs = _moved(inputs, device)
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _moved(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: _moved(v, device) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True) if isinstance(inputs, torch.Tensor) else inputs


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
