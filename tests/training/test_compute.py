"""Device placement, mixed precision and workers: what can be checked without a GPU here, and the GPU paths
themselves (marked `gpu`, skipped where there is no CUDA)."""

import pytest
import torch

from hpqdeploy.config import ComputeOptions, TrainConfig
from hpqdeploy.core.quantize import attach, calibrate
from hpqdeploy.errors import UserError
from hpqdeploy.models.cifar_resnet import CifarResNet
from hpqdeploy.training import compute as compute_mod
from hpqdeploy.training import distributed
from hpqdeploy.training.compute import Compute, default_workers, resolve_device
from hpqdeploy.training.loop import evaluate, finetune

CUDA = torch.cuda.is_available()


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def test_asking_for_cuda_where_there_is_none_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="^--device cuda: no CUDA device here") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_fp16_needs_cuda_and_the_defaults_follow_the_device(monkeypatch):
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        Compute(ComputeOptions(device="cpu", precision="fp16"))
    assert default_workers(torch.device("cpu")) == 0
    monkeypatch.setattr(compute_mod.os, "cpu_count", lambda: 16)
    assert default_workers(torch.device("cuda")) == 8
    with pytest.raises(UserError, match="precision must be one of fp32, bf16, fp16"):
        ComputeOptions(precision="fp8")


def test_sync_bn_is_refused_on_the_cpu_and_without_ranks():
    with pytest.raises(UserError, match="torchrun with several ranks"):
        distributed.wrap(CifarResNet(8, num_classes=4), torch.device("cpu"), sync_bn=True)


def test_quantizers_compute_in_fp32_under_bf16_autocast():
    """The grid under autocast is the fp32 one: the same quantized activations, whatever the precision."""
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=4).eval()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            attach(m, torch.full((m.out_channels,), 8, dtype=torch.int8), 8, None)
    calibrate(model, _data(2))
    layer = model.layer1[0].conv1
    x = torch.randn(4, 16, 16, 16)
    fp32 = layer.quantize_activation(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer.quantize_activation(x.bfloat16())
    assert mixed.dtype == torch.float32
    step = float((layer.act_range[1] - layer.act_range[0]) / 255)
    assert (mixed - fp32).abs().max() <= step + 1e-6  # only bf16's rounding of the input, never another grid


def test_bf16_training_on_the_cpu_runs_and_records_its_settings():
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=4)
    c = Compute(ComputeOptions(device="cpu", precision="bf16", channels_last=True))
    c.place(model)
    history = finetune(model, _data(), TrainConfig(epochs=1, batch_size=8), quiet=True, compute=c)
    assert history[0]["train_loss"] > 0
    assert evaluate(model, _data(1, seed=1), compute=c)["examples"] == 8
    assert c.describe() == {"device": "cpu", "precision": "bf16", "workers": 0, "channels_last": True,
                            "world_size": 1, "cuda": None}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_training_on_cuda_saves_the_same_kind_of_weights(precision):
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=4)
    c = Compute(ComputeOptions(device="cuda", precision=precision, channels_last=True))
    c.place(model)
    teacher = CifarResNet(8, num_classes=4).to(c.device)
    finetune(model, _data(), TrainConfig(epochs=1, batch_size=8), quiet=True, compute=c, teacher=teacher)
    assert next(model.parameters()).is_cuda
    model.to("cpu").to(memory_format=torch.contiguous_format)
    assert all(not t.is_cuda and t.is_contiguous() for t in model.state_dict().values())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp16_uses_a_gradient_scaler_on_cuda():
    c = Compute(ComputeOptions(device="cuda", precision="fp16"))
    assert isinstance(c.scaler(), torch.amp.GradScaler) and c.scaler().is_enabled()
    assert c.workers >= 1 and c.pin_memory
