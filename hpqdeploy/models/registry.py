"""Build models by name and rebuild their architecture from a recorded `ModelSpec`.

The builders, one per family, are in `families`; what they return (`LoadedModel`, `ModelSpec`) is defined in
`spec`. A `ModelSpec` is plain JSON: enough to rebuild the (unpruned) architecture without weights or network
access, so an artifact directory can be loaded anywhere. Weights then come from the artifact's safetensors.
"""

from __future__ import annotations

from pathlib import Path

from hpqdeploy.errors import UserError
from hpqdeploy.models import torchvision_zoo
from hpqdeploy.models.families import FAMILIES, MODEL_NAMES
from hpqdeploy.models.spec import LoadedModel, ModelSpec


def model_names() -> list[str]:
    return sorted(MODEL_NAMES)


def is_registered_model(name: str) -> bool:
    """Whether `name` is a registered model name (not a torchvision name, a directory or module:function)."""
    return name in MODEL_NAMES


def model_family(name: str) -> str:
    """The family that builds `name`, without building it; a UserError saying which names work if none does."""
    return _family_of(name)


def _family_of(name: str) -> str:
    if name in MODEL_NAMES:
        return MODEL_NAMES[name]
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return "hf_text"
    if ":" in name and not Path(name).exists():
        return "factory"
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
    return FAMILIES[family](name=name, num_classes=num_classes, input_shape=input_shape, weights=weights,
                            max_length=max_length, pretrained=pretrained, **extra)


def rebuild_model(spec: ModelSpec) -> LoadedModel:
    """The unpruned architecture recorded in `spec`, without pretrained weights."""
    if spec.family not in FAMILIES:
        raise UserError(f"artifact names an unknown model family {spec.family!r}")
    return FAMILIES[spec.family](name=spec.name, weights=None, pretrained=False, **spec.args)
