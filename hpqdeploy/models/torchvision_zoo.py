"""torchvision classifiers: `mobilenet_v2`, `resnet50`, and every other name `torchvision.models` lists."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from hpqdeploy.errors import UserError


def is_torchvision_name(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def build(name: str, num_classes: int, weights: Path | None, pretrained: bool) -> nn.Module:
    import torchvision

    if weights is not None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        from hpqdeploy.models.spec import read_state_dict

        state = read_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            # An ImageNet checkpoint for a task with another class count: load the backbone, keep a new head.
            model = _with_new_head(_from_state(name, state), num_classes)
        return model
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as exc:  # no network and nothing in the torch hub cache
        raise UserError(f"cannot fetch ImageNet weights for {name} ({type(exc).__name__}); "
                        "pass --weights FILE with a local state_dict") from None
    return _with_new_head(model, num_classes)


def _from_state(name: str, state: dict) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"weights do not fit torchvision's {name}: {str(exc).splitlines()[0]}") from None
    return model


def _with_new_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last Linear layer if its class count differs."""
    last_name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_name, last = n, m
    if last is None or last.out_features == num_classes:
        return model
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))
    return model
