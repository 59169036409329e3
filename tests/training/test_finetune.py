"""The fine-tuning loop: one cosine schedule across phases, the per-step hook, the distillation loss."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset, default_collate

from hpqdeploy.config import TrainConfig
from hpqdeploy.denormals import flushed_share, set_flush
from hpqdeploy.errors import UserError
from hpqdeploy.training.loop import FeatureTap, Mix, attention_loss, attention_map, finetune, loader, lr_factor, mixup, training_loss


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


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_zero():
    assert [lr_factor(s, 8) for s in (0, 4, 8)] == pytest.approx([1.0, 0.5, 0.0])  # no warmup: plain cosine
    assert [lr_factor(s, 8, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [lr_factor(s, 8, 4) for s in (4, 6, 8, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_warmup_holds_the_first_steps_back_and_phases_keep_it(tmp_path):
    cfg = TrainConfig(epochs=4, lr=1e-2, warmup=2)
    whole = finetune(*_setup(), cfg, quiet=True)  # 5 steps an epoch, 10 of warmup; "lr": the next step's
    assert whole[0]["lr"] == pytest.approx(cfg.lr * 6 / 10) and whole[1]["lr"] == pytest.approx(cfg.lr)
    plain = finetune(*_setup(), TrainConfig(epochs=4, lr=1e-2), quiet=True)
    assert plain[0]["lr"] < cfg.lr and plain[0]["lr"] != pytest.approx(whole[0]["lr"])
    model, data = _setup()
    phased = (finetune(model, data, cfg, tmp_path / "a.ckpt", quiet=True, span=range(0, 1))
              + finetune(model, data, cfg, tmp_path / "b.ckpt", quiet=True, span=range(1, 4)))
    assert [h["lr"] for h in phased] == pytest.approx([h["lr"] for h in whole])


@pytest.mark.parametrize("kwargs,message", [
    ({"epochs": 2, "warmup": 2}, "warmup must be below epochs, got 2"), ({"warmup": -1}, "warmup must be >= 0"),
    ({"lr": 0}, "lr must be > 0, got 0"), ({"distill": 1.0}, "distill must be in [0, 1), got 1"),
    ({"temperature": 0}, "temperature must be > 0"), ({"optimizer": "lamb"}, "optimizer must be one of adam, sgd"),
    ({"mixup": -1}, "mixup must be >= 0"), ({"lr": float("nan")}, "lr must be a finite number")],
    ids=["warmup-past-epochs", "negative-warmup", "lr-0", "distill-1", "temperature-0", "unknown-optimizer",
         "negative-mixup", "lr-nan"])
def test_bad_training_config_is_refused_on_construction_naming_the_setting(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        TrainConfig(**kwargs)


def test_sgd_is_nesterov_momentum_and_a_checkpoint_resumes_only_with_its_own_optimizer(tmp_path):
    model, data = _setup()
    start = copy.deepcopy(model)
    history = finetune(model, data, TrainConfig(epochs=4, lr=0.1, optimizer="sgd"), tmp_path / "c.ckpt", quiet=True)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert state["optimizer_name"] == "sgd"
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert state["optimizer"]["param_groups"][0]["nesterov"] is True
    # Adam from the same start takes different steps
    adam = finetune(start, _setup()[1], TrainConfig(epochs=4, lr=0.1), quiet=True)
    assert adam[-1]["train_loss"] != pytest.approx(history[-1]["train_loss"])
    with pytest.raises(UserError, match="--optimizer sgd, not adam"):
        finetune(_setup()[0], data, TrainConfig(epochs=5, lr=0.1), tmp_path / "c.ckpt", resume=True, quiet=True)


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


def test_mixup_blends_pairs_of_images_and_weighs_both_labels():
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 3
    assert mixup(images, TrainConfig())[0] is images  # off by default: the batch is untouched
    torch.manual_seed(0)
    blended, mix = mixup(images, TrainConfig(mixup=1.0))
    assert 0 < mix.weight < 1 and sorted(mix.partner.tolist()) == list(range(8))
    assert torch.allclose(blended, mix.weight * images + (1 - mix.weight) * images[mix.partner])
    logits = torch.randn(8, 3)
    expected = 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(logits, labels[mix.partner])
    assert training_loss(logits, labels, None, TrainConfig(), Mix(0.3, mix.partner)) == pytest.approx(expected.item())
    with pytest.raises(UserError, match="--mixup blends images"):
        mixup({"input_ids": torch.ones(2, 5, dtype=torch.long)}, TrainConfig(mixup=1.0))


def test_mixup_shows_the_teacher_the_students_blend():
    """Distillation under mixup compares teacher and student on the same blended batch."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    seen = {"student": [], "teacher": []}

    class Recorder(nn.Linear):
        def __init__(self, role):
            super().__init__(4, 3)
            self.role = role

        def forward(self, x):
            seen[self.role].append(x.clone())
            return super().forward(x)

    student, teacher = Recorder("student"), Recorder("teacher")
    finetune(student, loader(data, default_collate, 8, shuffle=False), TrainConfig(epochs=1, mixup=1.0, distill=0.5),
             quiet=True, teacher=teacher)
    assert len(seen["student"]) == 2
    for s, t, clean in zip(seen["student"], seen["teacher"], data.tensors[0].split(8)):
        assert torch.equal(s, t) and not torch.allclose(s, clean)


def test_attention_map_ignores_channel_count_so_a_pruned_student_can_match():
    x = torch.randn(2, 4, 5, 5)
    same = attention_map(torch.cat([x, x], dim=1))  # twice the channels, same channel mean
    assert torch.allclose(attention_map(x), same, atol=1e-6)
    assert torch.allclose(attention_map(x).norm(dim=1), torch.ones(2))
    assert attention_loss({"a": x}, {"a": torch.cat([x, x], 1)}).item() == pytest.approx(0.0, abs=1e-9)
    assert attention_loss({"a": x}, {"a": torch.randn(2, 4, 5, 5)}).item() > 0


def _conv_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = TensorDataset(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,)))
    return model, loader(data, default_collate, batch_size=8, shuffle=False)


def test_attention_transfer_adds_to_the_loss_and_leaves_no_hooks():
    teacher, data = _conv_setup(0)
    plain_cfg = TrainConfig(epochs=1, lr=1e-9, distill=0.5)
    at_cfg = TrainConfig(epochs=1, lr=1e-9, distill=0.5, attention=1000.0, attention_layers=("1",))
    student, _ = _conv_setup(1)
    plain = finetune(student, data, plain_cfg, quiet=True, teacher=teacher)[0]["train_loss"]
    with_at = finetune(student, data, at_cfg, quiet=True, teacher=teacher)[0]["train_loss"]
    assert with_at > plain + 1e-3
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])
    # a student that already matches its teacher pays nothing for attention
    same = finetune(copy.deepcopy(teacher), data, at_cfg, quiet=True, teacher=teacher)[0]["train_loss"]
    assert same == pytest.approx(finetune(copy.deepcopy(teacher), data, plain_cfg, quiet=True,
                                          teacher=teacher)[0]["train_loss"], rel=1e-5)


def test_feature_tap_names_a_missing_layer():
    with pytest.raises(ValueError, match="layer9"):
        FeatureTap(nn.Sequential(nn.Linear(2, 2)), ("0", "layer9"))


def test_finetune_flushes_subnormals(tmp_path):
    """Adam's first moment of a weight whose gradient dies decays by 0.9 a step: after ~800 steps it is subnormal,
    and on Intel CPUs each operation on a subnormal is ~100x slower. finetune runs with them flushed to zero."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(1 << 18).mul_(2)  # torch's OpenMP workers exist before finetune starts, as in a real run
    set_flush(False)  # the process default; an earlier test may have turned it on
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    live = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    dead = (torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))  # zero inputs: no gradient for the weight
    cfg = TrainConfig(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=8)
    shares = []
    try:
        finetune(model, [live] + [dead] * 900, cfg, checkpoint=tmp_path / "c.ckpt", quiet=True,
                 before_step=lambda step, steps: shares.append(flushed_share()) if step == 0 else None)
    finally:
        torch.set_num_threads(threads)
    assert shares == [1.0]  # every thread flushes while it trains, the workers too
    moment = torch.load(tmp_path / "c.ckpt", weights_only=True)["optimizer"]["state"][0]["exp_avg"]
    tiny = torch.finfo(torch.float32).tiny
    assert not ((moment != 0) & (moment.abs() < tiny)).any()
    assert (moment == 0).all()  # 0.9**900 of the first step's moment is far below the smallest normal float
    assert flushed_share() == 0.0  # afterwards every thread computes subnormals again, as before the call


def test_the_transformer_lr_warning_is_about_adam():
    import warnings

    from hpqdeploy.pipeline import _check_recipe

    text = SimpleNamespace(modality="text", spec=SimpleNamespace(name="minilm"))
    with pytest.warns(UserWarning, match="with Adam"):
        _check_recipe(text, TrainConfig(lr=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_recipe(text, TrainConfig(lr=1e-3, optimizer="sgd"))  # SGD's usual learning rates are larger
        _check_recipe(text, TrainConfig(lr=5e-5))
        _check_recipe(SimpleNamespace(modality="image"), TrainConfig(lr=1e-3))


def test_mixup_on_a_text_model_is_refused_before_training():
    from hpqdeploy.pipeline import _check_recipe

    with pytest.raises(UserError, match="minilm is a text model"):
        _check_recipe(SimpleNamespace(modality="text", spec=SimpleNamespace(name="minilm")), TrainConfig(mixup=1.0))
    _check_recipe(SimpleNamespace(modality="image"), TrainConfig(mixup=1.0))


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(tmp_path):
    """Interrupted after epoch 2 of 3 (the checkpoint is all that survives), then resumed in a process whose random
    generators are elsewhere: the weights equal the uninterrupted run's bit for bit (data order, dropout masks)."""
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 6, generator=gen), torch.randint(0, 3, (96,), generator=gen))
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2)

    def model():
        torch.manual_seed(5)
        return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                   torch.nn.Linear(32, 3))

    whole = model()
    finetune(whole, loader(data, default_collate, 16, shuffle=True, seed=cfg.seed), cfg, quiet=True)
    ckpt = tmp_path / "run.ckpt"
    first = model()
    finetune(first, loader(data, default_collate, 16, shuffle=True, seed=cfg.seed), cfg, ckpt, quiet=True,
             span=range(0, 2))
    torch.manual_seed(999), np.random.seed(999), random.seed(999)  # a new process: nothing as it was
    resumed = model()
    finetune(resumed, loader(data, default_collate, 16, shuffle=True, seed=cfg.seed), cfg, ckpt, resume=True,
             quiet=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
