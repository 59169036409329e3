"""Build models by name and rebuild their architecture from a recorded `ModelSpec`.

A `ModelSpec` is plain JSON: enough to rebuild the (unpruned) architecture without weights or network access, so
an artifact directory can be loaded anywhere. Weights then come from the artifact's safetensors.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from hpqdeploy.errors import UserError


@dataclass
class ModelSpec:
    family: str  # "cifar_resnet" | "torchvision" | "hf_text" | "factory"
    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, blob: dict) -> "ModelSpec":
        return cls(**blob)


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    modality: str  # "image" | "text"
    collate: Callable[[list], tuple[Any, torch.Tensor]]
    example_inputs: Any  # a tensor, or a dict of tensors for text models
    tokenizer: Any = None


def image_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*items)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)


_BUILDERS: dict[str, Callable[..., LoadedModel]] = {}
_NAMES: dict[str, str] = {}  # registered model name -> family


def register_family(family: str, names: list[str]):
    def deco(fn):
        _BUILDERS[family] = fn
        for n in names:
            _NAMES[n] = family
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_NAMES)


def is_registered_model(name: str) -> bool:
    """Whether `name` is a registered model name (not a torchvision name, a directory or module:function)."""
    _import_families()
    return name in _NAMES


def model_family(name: str) -> str:
    """The family that builds `name`, without building it; a UserError saying which names work if none does."""
    _import_families()
    return _family_of(name)


def _family_of(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return "hf_text"
    if ":" in name and not Path(name).exists():
        return "factory"
    from hpqdeploy.models import torchvision_zoo

    if torchvision_zoo.is_torchvision_name(name):
        return "torchvision"
    raise UserError(
        f"unknown model {name!r}: use one of {', '.join(model_names())}, a torchvision classifier name, "
        "a local Hugging Face model directory, or module:function"
    )


def load_model(name: str, *, num_classes: int, input_shape: tuple[int, ...] | None = None,
               weights: Path | None = None, max_length: int = 64, pretrained: bool = True,
               head_dropout: float | None = None) -> LoadedModel:
    """Build `name` for a task with `num_classes` classes, loading pretrained weights unless `pretrained=False`;
    `head_dropout` overrides a text model's classification-head dropout (the plan's 0.5 otherwise)."""
    _import_families()
    family = _family_of(name)
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"weights file not found: {weights}")
    extra = {}
    if head_dropout is not None:
        if family != "hf_text":
            raise UserError(f"--dropout sets a text model's classification-head dropout; {name} is not a text model")
        if not 0.0 <= head_dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {head_dropout:g}")
        extra["head_dropout"] = head_dropout
    return _BUILDERS[family](name=name, num_classes=num_classes, input_shape=input_shape, weights=weights,
                             max_length=max_length, pretrained=pretrained, **extra)


def read_state_dict(path: Path) -> dict:
    """A checkpoint's state_dict (bare, or under a "state_dict" key), loaded with weights_only=True; a
    `.safetensors` file (a `train` output's model.safetensors, or a hub's) is read as one."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError for bad bytes, OSError, ...
            raise UserError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # foreign bytes make the weights-only unpickler raise IndexError, KeyError, ... too
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}); "
                        "pass a state_dict saved with torch.save") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def rebuild_model(spec: ModelSpec) -> LoadedModel:
    """The unpruned architecture recorded in `spec`, without pretrained weights."""
    _import_families()
    if spec.family not in _BUILDERS:
        raise UserError(f"artifact names an unknown model family {spec.family!r}")
    return _BUILDERS[spec.family](name=spec.name, weights=None, pretrained=False, **spec.args)


def call_factory(target: str, **kwargs) -> nn.Module:
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import model factory {target!r}: {exc}; its module must be importable from here "
                        "(on PYTHONPATH, or an installed package)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"cannot import model factory {target!r}: module {module_name} has no function {fn_name!r}")
    accepted = inspect.signature(fn).parameters
    model = fn(**{k: v for k, v in kwargs.items() if k in accepted})
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_families() -> None:
    from hpqdeploy.models import families  # noqa: F401  (registers the builders)
