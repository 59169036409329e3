import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hpqdeploy.core.qparams import qmax, quantize_weight, weight_scales
from hpqdeploy.core.quantize import CLIP_GRID, QConv2d, QEmbedding, QLinear, attach, calibrate, fake_quant_activation, fake_quant_weight, op_kind, quantizable_layers, search_clip, set_observing

EPS = 1e-6


def _weight(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _grouped(t, group):
    flat = t.reshape(t.shape[0], -1)
    return flat.view(flat.shape[0], -1, group or flat.shape[1])


CASES = [  # (weight shape, group size)
    ((6, 5, 3, 3), None),  # conv, per output channel
    ((12, 64), None),  # linear, per output channel
    ((12, 64), 16),  # linear, per group of 16 inputs
    ((4, 96), 32),
]


@pytest.mark.parametrize("shape, group", CASES)
@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_step(shape, group, bits):
    w = _weight(shape)
    out = shape[0]
    b = torch.full((out,), bits)
    clip = torch.ones(out)
    q = quantize_weight(w, b, clip, group)
    s = weight_scales(w, b, clip, group)  # (out, groups, 1)
    err = (_grouped(q, group) - _grouped(w, group)).abs()
    assert torch.all(err <= s / 2 + EPS)
    assert q.shape == w.shape
    # The step really is amax / qmax per channel or group (so the bound above is not vacuous).
    amax = _grouped(w, group).abs().amax(2, keepdim=True)
    assert torch.allclose(s, amax / (2 ** (bits - 1) - 1))


@pytest.mark.parametrize("shape, group", CASES)
def test_mixed_bits_per_channel(shape, group):
    w = _weight(shape, seed=1)
    b = torch.tensor([8, 4] * (shape[0] // 2))
    q = quantize_weight(w, b, torch.ones(shape[0]), group)
    s = weight_scales(w, b, torch.ones(shape[0]), group)
    levels = (_grouped(q, group) / s).round()
    for row, bits in enumerate(b.tolist()):
        assert levels[row].abs().max() == 2 ** (bits - 1) - 1  # the largest weight lands on the top level


@pytest.mark.parametrize("shape, group", CASES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_symmetric_narrow_range_zero_point_zero(shape, group, bits):
    w = _weight(shape, seed=2)
    w.view(-1)[::7] = 0.0
    out = shape[0]
    b = torch.full((out,), bits)
    clip = torch.full((out,), 0.7)  # clipped: values beyond the range saturate at +-qmax
    q = quantize_weight(w, b, clip, group)
    s = weight_scales(w, b, clip, group)
    levels = _grouped(q, group) / s
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # integer multiples of the scale
    top = 2 ** (bits - 1) - 1
    assert levels.round().abs().max() == top  # narrow range: -qmax..qmax, never -qmax-1
    assert torch.all(q.view(-1)[::7] == 0)  # zero is exact: zero point 0
    assert torch.equal(quantize_weight(-w, b, clip, group), -q)  # symmetric


def test_qmax_never_below_one():
    assert qmax(torch.tensor([8, 4, 2, 1])).tolist() == [127.0, 7.0, 1.0, 1.0]


def test_straight_through_gradient():
    w = _weight((8, 16)).requires_grad_()
    b = torch.full((8,), 4)
    q = fake_quant_weight(w, b, torch.ones(8), None)
    assert torch.equal(q.detach(), quantize_weight(w.detach(), b, torch.ones(8), None))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qconv_gradient_is_the_gradient_at_the_quantized_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    attach(conv, torch.full((8,), 4), None, None)
    conv(x).square().sum().backward()
    wq = quantize_weight(conv.weight.detach(), conv.w_bits, conv.w_clip, None).requires_grad_()
    F.conv2d(x, wq, padding=1).square().sum().backward()
    assert torch.allclose(conv.weight.grad, wq.grad, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group", [None, 16])
def test_search_clip_never_worse_than_no_clip(bits, group):
    w = _weight((16, 64), seed=3)
    w[:, 0] = 3 * w[:, 1:].abs().amax(1)  # one outlier per channel: clipping pays off at low bit widths
    b = torch.full((16,), bits)
    clip = search_clip(w, b, group)
    assert clip.shape == (16,)
    assert all(float(c) in CLIP_GRID.tolist() for c in clip)
    err = ((quantize_weight(w, b, clip, group) - w) ** 2).sum(1)
    err_unclipped = ((quantize_weight(w, b, torch.ones(16), group) - w) ** 2).sum(1)
    assert torch.all(err <= err_unclipped)
    if bits <= 4:
        assert (clip < 1).any() and err.sum() < err_unclipped.sum()


def test_search_clip_respects_importance():
    w = _weight((4, 64), seed=4)
    w[:, 0] = 3 * w[:, 1:].abs().amax(1)  # each channel's largest weight
    b = torch.full((4,), 4)
    outlier_matters = torch.ones_like(w)
    outlier_matters[:, 0] = 1e6
    plain = search_clip(w, b, None)
    weighted = search_clip(w, b, None, importance=outlier_matters)
    assert torch.all(weighted == 1.0)  # an important outlier must not be clipped
    assert torch.all(plain < 1.0)


@pytest.mark.parametrize("lo, hi", [(-1.3, 2.7), (0.0, 5.0), (-4.0, -1.0), (0.5, 1.5)])
def test_activation_error_at_most_half_a_step_inside_range(lo, hi):
    x = torch.linspace(lo, hi, 2001)
    y = fake_quant_activation(x, torch.tensor(lo), torch.tensor(hi), 8)
    lo_, hi_ = min(lo, 0.0), max(hi, 0.0)  # the range always holds zero
    step = (hi_ - lo_) / 255
    assert (y - x).abs().max() <= step / 2 + EPS
    assert len(torch.unique(y)) <= 256
    zero = fake_quant_activation(torch.zeros(1), torch.tensor(lo), torch.tensor(hi), 8)
    assert zero.item() == 0.0  # zero (ReLU output, padding) is exact


def test_activation_saturates_outside_range():
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    y = fake_quant_activation(torch.tensor([-50.0, 50.0]), lo, hi, 8)
    step = 2.0 / 255
    assert abs(y[0].item() + 1.0) <= step and abs(y[1].item() - 1.0) <= step


@pytest.mark.parametrize("make, cls", [
    (lambda: nn.Conv2d(4, 8, 3, bias=True), QConv2d),
    (lambda: nn.Linear(16, 8), QLinear),
    (lambda: nn.Embedding(20, 8), QEmbedding),
])
def test_attach_keeps_class_names_and_tensors(make, cls):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    base_type = type(model[0])
    names = [n for n, _ in model.named_parameters()]
    weight = model[0].weight
    attach(model[0], torch.full((8,), 8), 8, None)
    assert type(model[0]) is cls and isinstance(model[0], base_type)
    assert [n for n, _ in model.named_parameters()] == names
    assert model[0].weight is weight
    state = model.state_dict()
    assert {"0.w_bits", "0.w_clip", "0.act_range", "0.act_bits", "0.w_group"} <= set(state)
    assert int(model[0].act_bits) == (0 if base_type is nn.Embedding else 8)  # embeddings take indices
    assert model[0].w_bits.dtype == torch.int8


def test_attach_twice_updates_bits():
    lin = nn.Linear(16, 8)
    attach(lin, torch.full((8,), 8), 8, None)
    attach(lin, torch.tensor([4] * 8), 8, None)
    assert lin.w_bits.tolist() == [4] * 8


def test_quantized_layers_follow_their_float_twin():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(64, 32)
    ref = lin(x)
    attach(lin, torch.full((16,), 8), 8, None)
    calibrate(nn.Sequential(lin), [(x, None)])
    out8 = lin(x)
    lin.w_bits.fill_(2)
    out2 = lin(x)
    err8, err2 = (out8 - ref).abs().max(), (out2 - ref).abs().max()
    assert 0 < err8 < 0.05 * ref.abs().max()
    assert err2 > 5 * err8


def test_calibrate_sets_activation_ranges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).train()
    for m in (model[0], model[2]):
        attach(m, torch.full((m.weight.shape[0],), 8), 8, None)
    assert torch.isinf(model[0].act_range).all()
    batches = [(torch.randn(10, 4) * (i + 1), None) for i in range(3)]
    calibrate(model, batches)
    lows = torch.stack([x.min() for x, _ in batches]).mean()
    highs = torch.stack([x.max() for x, _ in batches]).mean()
    assert torch.allclose(model[0].act_range, torch.stack([lows, highs]))  # running mean of batch extremes
    assert model[2].act_range[0] >= 0 and model[2].act_range[1] > 0  # after ReLU
    assert model.training and not model[0].observing  # state restored
    before = model[0].act_range.clone()
    model.eval()
    model(torch.randn(5, 4) * 100)
    assert torch.equal(model[0].act_range, before)  # eval forwards leave the range alone


def test_training_tracks_range_with_momentum():
    lin = nn.Linear(4, 2)
    attach(lin, torch.full((2,), 8), 8, None)
    lin.act_range.copy_(torch.tensor([-1.0, 1.0]))
    lin.train()
    x = torch.tensor([[-3.0, 0.0, 1.0, 5.0]])
    lin(x)
    m = lin.momentum
    assert torch.allclose(lin.act_range, torch.tensor([-1 + m * (-3 + 1), 1 + m * (5 - 1)]))


def test_set_observing_resets_the_count():
    lin = nn.Linear(4, 2)
    attach(lin, torch.full((2,), 8), 8, None)
    set_observing(lin, True)
    lin(torch.ones(1, 4) * 2)
    lin(torch.ones(1, 4) * 4)
    set_observing(lin, True)  # a new calibration starts from scratch
    lin(torch.ones(1, 4) * -1)
    assert lin.act_range.tolist() == [-1.0, -1.0]


def test_op_kinds_and_quantizable_layers():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4, 2),
                          nn.Embedding(5, 3), nn.BatchNorm2d(4))
    assert [op_kind(m) for m in list(model)[:5] if not isinstance(m, nn.Flatten)] == \
        ["depthwise_conv", "conv", "linear", "embedding"]
    assert sorted(quantizable_layers(model)) == ["0", "1", "3", "4"]
    attach(model[3], torch.full((2,), 4), 8, None)
    assert "3" in quantizable_layers(model)


def test_dynamic_activations_use_the_batch_range():
    lin = nn.Linear(4, 2)
    attach(lin, torch.full((2,), 8), 8, None)
    lin.act_dynamic = True
    lin.eval()
    x = torch.tensor([[-3.0, 0.0, 1.0, 5.0]])
    y = lin(x)
    expected = F.linear(fake_quant_activation(x, torch.tensor(-3.0), torch.tensor(5.0), 8), lin.qweight(), lin.bias)
    assert torch.equal(y, expected)
    assert torch.isinf(lin.act_range).all()  # no calibrated range needed, none recorded
