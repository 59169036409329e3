"""What every data set provides: three disjoint splits and the facts a model needs to consume them.

Image items are `(float tensor C x H x W, normalised with `info.mean`/`info.std`, int label)`; the train split
applies the data set's augmentation. Text items are `(str, int label)`, or `((str, str), int label)` for sentence
pairs; tokenisation belongs to the model (it owns the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from torch.utils.data import Dataset

from hpqdeploy.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    modality: Literal["image", "text"]
    num_classes: int
    input_shape: tuple[int, ...] | None = None  # (C, H, W) for images
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    text_pair: bool = False
    eval_split_name: str = "test"  # what the evaluation split is called by the data set's authors


@dataclass
class Splits:
    """Fine-tuning, calibration (held out of the training data, disjoint from `train`) and evaluation splits."""

    info: DatasetInfo
    train: Dataset
    calib: Dataset
    eval: Dataset


@dataclass(frozen=True)
class DataRequest:
    data_dir: Path | None = None
    seed: int = 0
    calib_size: int = 512
    train_limit: int | None = None  # None: the whole training split (minus calibration)
    eval_limit: int | None = None  # None: the whole held-out split
    cache_dir: Path | None = None


Loader = Callable[[DataRequest], Splits]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _REGISTRY[name] = fn
        return fn

    return deco


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def load_data(name: str, request: DataRequest | None = None) -> Splits:
    if name not in _REGISTRY:
        raise UserError(f"unknown data set {name!r}; known: {', '.join(dataset_names())}")
    return _REGISTRY[name](request or DataRequest())
