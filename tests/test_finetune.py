"""The fine-tuning loop: one cosine schedule across phases, the per-step hook, the distillation loss."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset, default_collate

from hpqdeploy.finetune import TrainConfig, finetune, loader, training_loss


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    return nn.Linear(4, 3), loader(data, default_collate, batch_size=8, shuffle=True, seed=seed)


def test_phases_continue_one_cosine_schedule(tmp_path):
    cfg = TrainConfig(epochs=4, lr=1e-2)
    model, data = _setup()
    whole = finetune(model, data, cfg, quiet=True)
    model, data = _setup()
    phased = (finetune(model, data, cfg, tmp_path / "a.ckpt", quiet=True, span=range(0, 1))
              + finetune(model, data, cfg, tmp_path / "b.ckpt", quiet=True, span=range(1, 4)))
    assert [h["epoch"] for h in phased] == [1, 2, 3, 4]
    assert [h["lr"] for h in phased] == pytest.approx([h["lr"] for h in whole])
    assert phased[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and phased[0]["lr"] < cfg.lr


def test_before_step_sees_every_step_of_its_span():
    cfg = TrainConfig(epochs=3)
    model, data = _setup()
    seen = []
    finetune(model, data, cfg, quiet=True, span=range(1, 3), before_step=lambda step, steps: seen.append((step, steps)))
    assert seen == [(i, 2 * len(data)) for i in range(2 * len(data))]


def test_distillation_mixes_cross_entropy_and_teacher_agreement():
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    ce = F.cross_entropy(logits, labels)
    assert training_loss(logits, labels, None, TrainConfig(distill=0.9)) == pytest.approx(ce.item())
    # a teacher that agrees exactly adds nothing beyond the weighted cross-entropy
    assert training_loss(logits, labels, logits, TrainConfig(distill=0.9)).item() == pytest.approx(0.1 * ce.item())
    assert training_loss(logits, labels, -logits, TrainConfig(distill=0.9)).item() > ce.item()
