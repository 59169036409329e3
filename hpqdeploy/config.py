"""The stages' configurations: every setting a user can give, declared once (see `hpqdeploy.settings`).

Each class is frozen and checked on construction. The command-line options, the experiment file's keys and the
Python keyword arguments are these fields, under the same names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from hpqdeploy import settings
from hpqdeploy.settings import SettingError, setting

METHODS = ("hybrid", "prune", "quant")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")


def names_in(module: str, attr: str) -> Callable[[], list[str]]:
    """The names `module.attr` lists (its result if it is a function), imported only when first asked for."""
    def names() -> list[str]:
        found = getattr(importlib.import_module(module), attr)
        return list(found() if callable(found) else found)
    return names


_datasets = names_in("hpqdeploy.data", "dataset_names")
_runtimes = names_in("hpqdeploy.lower.base", "runtime_names")


@dataclass(frozen=True)
class ModelOptions:
    """How `train` builds the baseline's model."""

    model: str = setting("", "registry name (resnet20, mobilenet_v2, minilm, ...), Hugging Face directory or "
                             "module:function", surfaces=("toml",))
    weights: str | None = setting(None, "pretrained weights: a state_dict file or .safetensors")
    scratch: bool = setting(False, "random initialisation instead of pretrained weights")
    max_length: int = setting(64, "text models: tokens per example", ge=1)
    dropout: float | None = setting(None, "text models: dropout of the classification head (default 0.5)",
                                    ge=0, lt=1)

    def __post_init__(self) -> None:
        settings.validate(self)


@dataclass(frozen=True)
class DataOptions:
    """Which data set, where, and how much of it."""

    name: str = setting("", "data set name (cifar10, sst2, digits, ...)", key="data", choices=_datasets)
    data_dir: str | None = setting(None, "where the data set lives (default: the shared data, or the one the "
                                         "input artifact records)")
    calib_size: int = setting(512, "examples held out to calibrate and measure importance on", ge=1)
    train_limit: int | None = setting(None, "train on this many examples (default: all)", ge=1)
    eval_limit: int | None = setting(None, "evaluate on this many examples (default: all)", ge=1)

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            settings.coerce(self, data_dir=str(self.data_dir))
        settings.validate(self)

    def request(self, seed: int):
        from hpqdeploy.data import DataRequest

        return DataRequest(Path(self.data_dir) if self.data_dir else None, seed, self.calib_size,
                           self.train_limit, self.eval_limit)


@dataclass(frozen=True)
class TrainConfig:
    """The fine-tuning loop's settings (`train`'s baseline, `compress`'s recovery)."""

    epochs: int = setting(10, "training epochs", ge=0)
    lr: float = setting(1e-3, "peak learning rate", gt=0)
    weight_decay: float = setting(1e-4, "weight decay", ge=0)
    batch_size: int | None = setting(None, "examples per step (default 64 for images, 32 for text)", ge=1)
    seed: int = setting(0, "seed of the initialisation, the data order and augmentation", surfaces=("cli",))
    distill: float = setting(0.9, "weight of distillation from the uncompressed model (0: off)", ge=0, lt=1)
    temperature: float = setting(4.0, "distillation temperature", gt=0)
    warmup: float = setting(0.0, "epochs of linear learning-rate warmup before the cosine decay (0: none)", ge=0)
    optimizer: str = setting("adam", "adam | sgd (Nesterov momentum 0.9; give it a larger lr, e.g. 0.01-0.1)",
                             choices=OPTIMIZERS)
    scale_lr: bool = setting(False, "under torchrun: multiply lr by the number of ranks (the linear scaling "
                                    "rule; the global batch is the per-rank batch times the ranks)")
    mixup: float = setting(0.0, "image models: blend training images in pairs, weight ~ Beta(alpha, alpha) "
                                "(0: off; e.g. 1)", ge=0, experimental=True)
    attention: float = setting(0.0, "weight of attention transfer from the teacher at attention_layers (0: off)",
                               ge=0, experimental=True, surfaces=())
    attention_layers: tuple[str, ...] = setting((), "layers whose feature maps attention transfer matches",
                                                surfaces=())

    def __post_init__(self) -> None:
        settings.coerce(self, attention_layers=tuple(self.attention_layers))
        settings.validate(self)
        if self.epochs > 0 and self.warmup >= self.epochs:
            raise SettingError("warmup", "must be below {epochs}", self.warmup)

    def with_batch(self, modality: str) -> "TrainConfig":
        """The modality's default batch (64 images, 32 text) where none was given."""
        return self if self.batch_size else replace(self, batch_size=32 if modality == "text" else 64)


@dataclass(frozen=True)
class ComputeOptions:
    """Where the PyTorch stages run and how fast; none of it changes what they decide."""

    device: str = setting("auto", "auto (CUDA when present) | cpu | cuda | cuda:N")
    precision: str = setting("fp32", "fp32 | bf16 | fp16: autocast for training and evaluation (fp16 with a "
                                     "gradient scaler, CUDA only); the quantizers' arithmetic stays fp32",
                             choices=PRECISIONS)
    workers: int | None = setting(None, "data-loader worker processes (default: 0 on the CPU, up to 8 with CUDA)",
                                  ge=0)
    channels_last: bool = setting(False, "convolutional models: channels-last memory format")
    sync_bn: bool = setting(False, "under torchrun on CUDA: BatchNorm statistics synchronised across ranks")

    def __post_init__(self) -> None:
        settings.validate(self)


@dataclass(frozen=True)
class CompressOptions:
    """What `compress` removes and how it quantizes; `train` is the recovery fine-tuning."""

    method: str = setting("hybrid", "hybrid | prune | quant", choices=METHODS, surfaces=("cli",))
    prune_ratio: float = setting(0.3, "fraction of neurons/channels removed per layer", gt=0, lt=1)
    bits: tuple[int, ...] = setting((8, 4), "weight bit widths, high and low (repeat the option)", ge=2, le=8)
    low_bit_share: float = setting(0.5, "budget: share of weights at the low width", ge=0, le=1)
    act_bits: int | None = setting(8, "activation bits (0: float activations)", ge=0, le=8)
    importance: str = setting("taylor", "taylor | magnitude", choices=names_in("hpqdeploy.core.importance", "CRITERIA"))
    target: str | None = setting(None, "restrict to what this runtime executes (default: what all of them do)",
                                 choices=names_in("hpqdeploy.core.targets", "target_names"))
    calib_batches: int = setting(8, "calibration batches (importance, sensitivity, activation ranges)", ge=1)
    fade: float = setting(0.0, "share of the epochs over which pruned channels fade out before removal "
                               "(0: remove at once)", ge=0, lt=1, experimental=True)
    reconstruct: bool = setting(False, "after removing channels, re-fit the layers that read them to the "
                                       "baseline's outputs (least squares on calibration data)", experimental=True)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        settings.coerce(self, bits=tuple(self.bits), act_bits=self.act_bits or None)
        settings.validate(self)
        if self.method != "prune" and len(set(self.bits)) > 2:
            raise SettingError("bits", "takes one or two widths (the important channels' and the others')",
                               list(self.bits))
        if self.reconstruct and self.fade > 0:
            raise SettingError("reconstruct", "re-fits layers after channels are removed at once; it does not go "
                                              "with {fade}")

    def fade_epochs(self) -> int:
        """Whole epochs of fading, leaving at least one epoch to fine-tune the pruned (and quantized) model."""
        return max(0, min(round(self.fade * self.train.epochs), self.train.epochs - 1))


@dataclass(frozen=True)
class ExportOptions:
    """Lowering into one runtime and the check inside it."""

    target: str = setting("", "tensorrt | openvino | executorch | onnxruntime", choices=_runtimes,
                          surfaces=("cli",))
    mixed: str = setting("split", "mixed bit widths in one layer: split | layer",
                         choices=names_in("hpqdeploy.lower.legalize", "MIXED_MODES"))
    batch_size: int = setting(32, "evaluation batch", ge=1)
    eval_limit: int | None = setting(None, "evaluate on this many examples (default: all)", ge=1)
    calib_batches: int = setting(8, "calibration batches", ge=1, surfaces=("toml",))
    threads: int = setting(1, "runtime threads", ge=1)
    data_dir: str | None = setting(None, "default: the one recorded in the artifact", surfaces=("cli",))
    overflow_fix: str = setting("auto", "int8 kernels exact on x86 CPUs without VNNI (OpenVINO: 7-bit weights; ONNX "
                                        "Runtime: u8 x u8): auto (this CPU) | on | off",
                                choices=names_in("hpqdeploy.lower.legalize", "OVERFLOW_FIX"))

    def __post_init__(self) -> None:
        settings.validate(self)


@dataclass(frozen=True)
class ProfileOptions:
    """Where and how an exported artifact is timed and metered."""

    device: str = setting("x86", "device kind: a file in profiles/",
                          choices=names_in("hpqdeploy.device.profiles", "profile_names"))
    runner: str | None = setting(None, "default: the device's runner for the artifact",
                                 choices=names_in("hpqdeploy.device.runners.base", "runner_names"))
    batch_size: int = setting(1, "batch size", ge=1, surfaces=("cli",))
    threads: int = setting(1, "runtime threads", ge=1)
    warmup: int = setting(20, "untimed calls before timing", ge=0)
    warmup_seconds: float = setting(0.5, "and warm up at least this long", ge=0)
    iters: int = setting(200, "timed calls per repeat", ge=1)
    min_seconds: float = setting(0.0, "and at least this long per repeat", ge=0)
    repeats: int = setting(3, "repeats", ge=1)
    idle_seconds: float = setting(2.0, "idle power window (with a meter)", ge=0)
    pin_clocks: bool = setting(False, "run the profile's clock-pinning commands")
    serial: str | None = setting(None, "adb device serial (android)")
    data_dir: str | None = setting(None, "default: the one recorded in the artifact", surfaces=("cli",))
    meter: str | None = setting(None, "another power meter, e.g. tegrastats on Jetsons")

    def __post_init__(self) -> None:
        settings.validate(self)


STAGES = (ModelOptions, DataOptions, TrainConfig, ComputeOptions, CompressOptions, ExportOptions, ProfileOptions)
