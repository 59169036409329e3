"""One small interface per runtime; `export.py` never branches on a runtime's name.

A runtime lowers the (legalized) fake-quant PyTorch model into its native artifact, loads that artifact for
inference pinned to a thread count, and reads the artifact back to say which ops and precisions it really holds.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from hpqdeploy.core.targets import Target
from hpqdeploy.errors import MissingExtra, UserError
from hpqdeploy.registry import Registry


@dataclass
class LoweringContext:
    model: nn.Module  # the legalized fake-quant model, eval mode (BN not folded; each runtime decides)
    target: Target
    example_inputs: Any  # a tensor (images) or a dict of tensors (text); batch dimension first
    calib: list  # calibration batches [(inputs, labels)], the same split `compress` used
    modality: str  # "image" | "text"
    batch_sizes: tuple[int, ...] = (1, 32)  # batches the artifact must run (static-shape runtimes: one program each)
    overflow_fix: bool = False  # int8 kernels must stay exact on x86 CPUs without VNNI (see Runtime.overflow_fix_by)


@dataclass
class Lowered:
    files: list[Path]  # everything the runtime needs, inside the output directory
    notes: list[str] = field(default_factory=list)  # what the lowering did that a user must know


class Session(ABC):
    """Inference on a lowered artifact: numpy inputs (one array, or a dict for text) to numpy logits."""

    @abstractmethod
    def __call__(self, inputs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray: ...

    def info(self) -> dict:
        return {}


class Runtime(ABC):
    name: str
    extra: str  # the pip extra that installs it
    modules: tuple[str, ...]  # importable modules it needs
    # True where the runtime's x86 int8 kernels add u8 x i8 products in pairs into saturating int16 on CPUs
    # without VNNI. Where the artifact must run on such a CPU (`--overflow-fix`), export avoids it the runtime's way:
    # "narrow" (8-bit weights of int8 layers narrowed to 7 bits, legalize.narrow_int8_weights) or "unsigned" (the
    # lowering stores the weights as uint8 with zero point 128, for exact u8 x u8 kernels).
    int8_pairs_saturate: bool = False
    overflow_fix_by: str = "narrow"

    def missing(self) -> str | None:
        """The first required module that does not import, or None."""
        for mod in self.modules:
            try:
                importlib.import_module(mod)
            except ImportError:
                return mod
        return None

    def require(self) -> None:
        mod = self.missing()
        if mod is not None:
            raise MissingExtra(f"{mod} (needed for --target {self.name})", self.extra)

    @abstractmethod
    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered: ...

    @abstractmethod
    def load(self, out_dir: Path, threads: int = 1) -> Session: ...

    @abstractmethod
    def inspect(self, out_dir: Path) -> dict:
        """Ops and precisions read back from the artifact: {"ops": {op: count}, "weights": {dtype: count}, ...}."""


RUNTIMES: Registry[type[Runtime]] = Registry(
    "target", "hpqdeploy.lower", modules=("onnxruntime_rt", "tensorrt_rt", "openvino_rt", "executorch_rt"))
register_runtime = RUNTIMES.register
runtime_names = RUNTIMES.names


def get_runtime(name: str) -> Runtime:
    try:
        return RUNTIMES.get(name)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
