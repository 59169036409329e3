"""Where and how a model runs in PyTorch: the device, mixed precision, memory format and data-loader workers.

The settings (`ComputeOptions`) change how fast the stages run, not what they decide: the quantizers' arithmetic
(scales, rounding, clipping) stays in fp32 under any precision, and outputs are saved from the CPU, so the same
`model.safetensors` comes out whatever trained it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.nn as nn

from hpqdeploy.config import ComputeOptions
from hpqdeploy.errors import UserError
from hpqdeploy.hooks import model_device, to_device
from hpqdeploy.training import distributed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA when present, else the CPU), `cpu`, `cuda` or `cuda:N`; CUDA where there is none is one line."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: no CUDA device here (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (CPU kernels run fp16 slowly or not at all); "
                        "use bf16 on the CPU")


def default_workers(device: torch.device) -> int:
    """On the CPU the cores compute, so batches are made in the main process; with a GPU, up to 8 worker
    processes, half the cores, decode and augment while it trains."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class Compute:
    """ComputeOptions resolved on this machine."""

    def __init__(self, options: ComputeOptions | None = None, device: torch.device | None = None):
        """`device`: an already placed model's device (no resolving, no joining a process group)."""
        self.options = options or ComputeOptions()
        if device is None:
            self.device = distributed.device_for(resolve_device(self.options.device))
            self.ranks = distributed.init(self.device)
        else:
            self.device, self.ranks = device, distributed.ranks()
        check_precision(self.options.precision, self.device)
        self.precision = self.options.precision
        self.workers = self.options.workers if self.options.workers is not None else default_workers(self.device)

    @classmethod
    def here(cls, model: nn.Module) -> "Compute":
        """fp32 on whichever device `model` is on, batches made in this process (the loops' default)."""
        return cls(ComputeOptions(workers=0), device=model_device(model))

    def batch(self, inputs: Any, labels: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """A batch on the device (channels-last images where the model is)."""
        if self.device.type == "cpu" and not self.options.channels_last:
            return inputs, labels
        return to_device(inputs, self.device, self.options.channels_last), labels.to(self.device, non_blocking=True)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device, channels-last where asked for and the model has convolutions."""
        model.to(self.device)
        if self.options.channels_last and has_conv(model):
            model.to(memory_format=torch.channels_last)
        return model

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision inside the block (nothing for fp32)."""
        if self.precision == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision]):
            yield

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs its gradients scaled against underflow; bf16 has fp32's range and does not."""
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "workers": self.workers,
                "channels_last": self.options.channels_last, "world_size": self.ranks.world,
                "cuda": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
