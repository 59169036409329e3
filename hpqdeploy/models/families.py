"""The builders behind the model registry, one per family, and the model names each one builds."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from hpqdeploy.errors import UserError
from hpqdeploy.models import cifar_resnet, hf_text, torchvision_zoo
from hpqdeploy.models.spec import LoadedModel, ModelSpec, call_factory, image_collate, read_state_dict

CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
FAMILIES: dict[str, Callable[..., LoadedModel]] = {}  # family -> builder
MODEL_NAMES: dict[str, str] = {}  # registered model name -> family


def register_family(family: str, names: list[str]):
    def deco(fn):
        FAMILIES[family] = fn
        for n in names:
            MODEL_NAMES[n] = family
        return fn

    return deco


def _image_example(input_shape) -> torch.Tensor:
    return torch.randn(1, *(input_shape or (3, 32, 32)))


@register_family("cifar_resnet", list(CIFAR_DEPTHS))
def _cifar_resnet(name: str, num_classes: int, input_shape=None, weights: Path | None = None,
                  pretrained: bool = True, **_) -> LoadedModel:
    in_channels = (input_shape or (3,))[0]
    model = cifar_resnet.CifarResNet(CIFAR_DEPTHS[name], num_classes=num_classes, in_channels=in_channels)
    if weights is not None:
        try:
            cifar_resnet.load_akamaster_checkpoint(model, weights)
        except (RuntimeError, KeyError, ValueError, AttributeError) as exc:
            raise UserError(f"{weights} does not fit {name} with {num_classes} classes and {in_channels} input "
                            f"channels: {str(exc).splitlines()[0][:160]}") from None
    spec = ModelSpec("cifar_resnet", name,
                     {"num_classes": num_classes, "input_shape": list(input_shape or (3, 32, 32))})
    return LoadedModel(model, spec, "image", image_collate, _image_example(input_shape))


@register_family("torchvision", [])
def _torchvision(name: str, num_classes: int, input_shape=None, weights: Path | None = None,
                 pretrained: bool = True, **_) -> LoadedModel:
    model = torchvision_zoo.build(name, num_classes, weights, pretrained)
    spec = ModelSpec("torchvision", name,
                     {"num_classes": num_classes, "input_shape": list(input_shape or (3, 224, 224))})
    return LoadedModel(model, spec, "image", image_collate, _image_example(input_shape))


@register_family("hf_text", ["minilm", *hf_text.HUB_NAMES])
def _hf_text(name: str, num_classes: int, weights: Path | None = None, pretrained: bool = True,
             max_length: int = 64, config: dict | None = None, tokenizer_dir: str | None = None,
             input_shape=None, head_dropout: float = hf_text.HEAD_DROPOUT, **_) -> LoadedModel:
    if weights is not None:
        raise UserError("--weights is for image models; pass a Hugging Face model directory as the model instead")
    model, tokenizer = hf_text.build(name, num_classes, pretrained, config=config, tokenizer_dir=tokenizer_dir,
                                     classifier_dropout=head_dropout)
    spec = ModelSpec("hf_text", name, {"num_classes": num_classes, "max_length": max_length,
                                       "config": model.hf.config.to_dict()})
    example = tokenizer(["an example sentence"], padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")
    example = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
    return LoadedModel(model, spec, "text", hf_text.text_collate(tokenizer, max_length), example, tokenizer)


@register_family("factory", [])
def _factory(name: str, num_classes: int, input_shape=None, weights: Path | None = None, **_) -> LoadedModel:
    model = call_factory(name, num_classes=num_classes, in_channels=(input_shape or (3,))[0])
    if weights is not None:
        state = read_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"{weights} does not fit {name}: {str(exc).splitlines()[0][:160]}") from None
    spec = ModelSpec("factory", name, {"num_classes": num_classes, "input_shape": list(input_shape or (3, 32, 32))})
    return LoadedModel(model, spec, "image", image_collate, _image_example(input_shape))
