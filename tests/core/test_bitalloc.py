import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hpqdeploy.core.bitalloc import low_bit_share, plan_bits
from hpqdeploy.core.quantize import op_kind, quantizable_layers
from hpqdeploy.core.targets import GENERIC, load_target, target_names
from hpqdeploy.errors import UserError


def _max_block_share(model, multiple):
    """The largest single allocation step (a block of `multiple` channels of one layer) as a share of all weights."""
    layers = quantizable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    return max(min(multiple, m.weight.shape[0]) * m.weight[0].numel() for m in layers.values()) / total


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_budget_respected(budget, criterion, tiny_resnet, resnet_calib):
    plan = plan_bits(tiny_resnet, resnet_calib, GENERIC, (8, 4), budget, criterion)
    assert set(plan) == set(quantizable_layers(tiny_resnet))
    share = low_bit_share(plan, tiny_resnet, 4)
    assert budget <= share <= budget + _max_block_share(tiny_resnet, GENERIC.channel_multiple) + 1e-9
    for name, lb in plan.items():
        assert set(lb.bits.tolist()) <= {4, 8}
        assert lb.bits.shape == (quantizable_layers(tiny_resnet)[name].weight.shape[0],)
        n_low = int((lb.bits == 4).sum())
        assert n_low % 8 == 0 or n_low == lb.bits.numel()  # whole blocks of the channel multiple
        assert lb.sensitivity is not None and lb.sensitivity >= 0
        assert lb.act_bits == 8


def test_budget_zero_keeps_everything_high(tiny_resnet, resnet_calib):
    plan = plan_bits(tiny_resnet, resnet_calib, GENERIC, (8, 4), 0.0, "taylor")
    assert all(torch.all(lb.bits == 8) for lb in plan.values())
    assert low_bit_share(plan, tiny_resnet, 4) == 0.0


def test_budget_one_takes_every_block(tiny_resnet, resnet_calib):
    plan = plan_bits(tiny_resnet, resnet_calib, GENERIC, (8, 4), 1.0, "magnitude")
    assert low_bit_share(plan, tiny_resnet, 4) == 1.0


class TwoPaths(nn.Module):
    """Two equal layers side by side; the `quiet` one's output is scaled down, so quantizing it barely matters."""

    def __init__(self):
        super().__init__()
        self.quiet = nn.Linear(32, 16)
        self.loud = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(0.001 * self.quiet(x) + self.loud(x))


@pytest.fixture(scope="module")
def two_paths():
    """A TwoPaths model trained on its calibration data (so its predictions are confident and meaningful)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(128, 32, generator=gen)
    y = (x @ torch.randn(32, 8, generator=gen)).argmax(1)
    model = TwoPaths()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), [(x[:64], y[:64]), (x[64:], y[64:])]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_most_sensitive_layer_keeps_8_bits(criterion, two_paths):
    model, calib = two_paths
    plan = plan_bits(model, calib, GENERIC, (8, 4), 0.4, criterion)
    assert plan["loud"].sensitivity > 100 * plan["quiet"].sensitivity
    assert plan["loud"].bits.tolist() == [8] * 16
    assert plan["quiet"].bits.tolist() == [4] * 16  # the cheap layer pays the whole budget
    assert low_bit_share(plan, model, 4) >= 0.4


def test_executorch_keeps_every_conv_at_8_bits(tiny_resnet, resnet_calib):
    target = load_target("executorch")
    plan = plan_bits(tiny_resnet, resnet_calib, target, (8, 4), 0.9, "taylor")
    layers = quantizable_layers(tiny_resnet)
    convs = [n for n, m in layers.items() if op_kind(m) == "conv"]
    assert len(convs) == 7
    for n in convs:
        assert torch.all(plan[n].bits == 8)
        assert plan[n].group_size is None and plan[n].act_bits == 8
    for n in convs:
        assert not plan[n].act_dynamic
    # The classifier is a linear layer: XNNPACK runs it at 4 bits, in groups of 32 inputs, with its input
    # quantized per batch (dynamic int8).
    assert torch.all(plan["linear"].bits == 4) and plan["linear"].group_size == 32
    assert plan["linear"].act_bits == 8 and plan["linear"].act_dynamic
    assert low_bit_share(plan, tiny_resnet, 4) < 0.9  # the budget cannot be met on this target


def test_onnxruntime_low_bit_linear_keeps_float_inputs(tiny_resnet, resnet_calib):
    plan = plan_bits(tiny_resnet, resnet_calib, load_target("onnxruntime"), (8, 4), 0.9, "magnitude")
    assert torch.all(plan["linear"].bits == 4) and plan["linear"].group_size == 32
    assert plan["linear"].act_bits is None and not plan["linear"].act_dynamic  # MatMulNBits: float activations
    assert plan["conv1"].act_bits == 8 and torch.all(plan["conv1"].bits == 8)


def test_group_size_that_does_not_divide_keeps_the_layer_high(tiny_resnet, resnet_calib):
    plan = plan_bits(tiny_resnet, resnet_calib, load_target("tensorrt"), (8, 4), 0.9, "magnitude")
    assert all(torch.all(lb.bits == 8) for lb in plan.values())  # 64 inputs are not a whole group of 128


@pytest.mark.parametrize("target, bits", [("tensorrt", (4,)), ("onnxruntime", (4,)), ("openvino", (4, 2))])
def test_bits_no_target_runs_are_a_user_error(target, bits, tiny_resnet, resnet_calib):
    with pytest.raises(UserError, match="conv"):
        plan_bits(tiny_resnet, resnet_calib, load_target(target), bits, 0.5, "taylor")


def test_only_low_bits_where_allowed(tiny_resnet, resnet_calib):
    plan = plan_bits(tiny_resnet, resnet_calib, GENERIC, (4,), 0.5, "taylor")
    assert all(torch.all(lb.bits == 4) for lb in plan.values())


@pytest.mark.parametrize("bits", [(9,), (8, 1), (16, 8), ()])
def test_bit_widths_out_of_range(bits, tiny_resnet, resnet_calib):
    with pytest.raises(UserError, match="--bits"):
        plan_bits(tiny_resnet, resnet_calib, GENERIC, bits, 0.5, "taylor")


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_budget_out_of_range(share, tiny_resnet, resnet_calib):
    with pytest.raises(UserError, match="--low-bit-share"):
        plan_bits(tiny_resnet, resnet_calib, GENERIC, (8, 4), share, "taylor")


def test_embedding_has_no_activation_quantization(tiny_bert, bert_calib):
    plan = plan_bits(tiny_bert, bert_calib, GENERIC, (8, 4), 0.5, "magnitude")
    emb = "hf.bert.embeddings.word_embeddings"
    assert plan[emb].act_bits is None
    assert plan["hf.bert.encoder.layer.0.attention.self.query"].act_bits == 8
    assert 0.5 <= low_bit_share(plan, tiny_bert, 4)


def test_targets_load():
    assert set(target_names()) >= {"executorch", "onnxruntime", "openvino", "tensorrt"}
    trt = load_target("tensorrt")
    assert trt.channel_multiple == 16
    assert trt.support("conv").weight_bits == (8,)
    assert trt.support("linear").group_size_for(4) == 128 and trt.support("linear").group_size_for(8) is None
    generic = load_target(None)  # widths every runtime runs fast on this machine
    assert generic.name == GENERIC.name
    assert all(generic.channel_multiple % load_target(n).channel_multiple == 0 for n in target_names())
    with pytest.raises(UserError, match="unknown target 'nosuch'"):
        load_target("nosuch")


def test_channel_multiple_follows_the_isa_family(monkeypatch):
    """`[channel_multiple_by_isa]` picks the measured multiple for this CPU's family; unmeasured families fall back."""
    import hpqdeploy.core.targets as targets

    monkeypatch.setattr(targets, "isa_family", lambda: "vnni")
    assert load_target("onnxruntime").channel_multiple == 16
    assert load_target("onnxruntime").isa_family == "vnni"
    monkeypatch.setattr(targets, "isa_family", lambda: "avx2")
    assert load_target("onnxruntime").channel_multiple == 8


def test_isa_family_from_cpu_flags():
    from hpqdeploy.lower.cpu import isa_family

    assert isa_family({"avx2", "avx512f", "avx512_vnni", "amx_int8"}) == "amx"
    assert isa_family({"avx2", "avx512f", "avx512_vnni"}) == "vnni"
    assert isa_family({"avx2", "avx_vnni"}) == "vnni"
    assert isa_family({"avx2", "fma"}) == "avx2"
    assert isa_family(set()) == "other"
