"""What a model builder returns, the JSON record that rebuilds a model, and the helpers builders share.

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
