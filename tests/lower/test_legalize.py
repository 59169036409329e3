"""Legalization for CPUs whose int8 kernels add u8 x i8 pairs in saturating int16 (no VNNI)."""

from __future__ import annotations

import copy

import pytest
import torch

from hpqdeploy.config import ExportOptions
from hpqdeploy.core.quantize import _QuantMixin, attach, calibrate, quantizable_layers
from hpqdeploy.core.targets import load_target
from hpqdeploy.errors import UserError
from hpqdeploy.core import qparams
from hpqdeploy.lower.cpu import has_vnni, int8_dot_product
from hpqdeploy.lower.export import run_export
from hpqdeploy.lower.legalize import NARROW_QMAX, legalize, narrow_int8_weights


def _quantized_resnet(model, calib):
    """Every other conv has half its channels at 4 bits (raised to 8-bit by legalization, values kept)."""
    for i, m in enumerate(quantizable_layers(model).values()):
        bits = torch.full((m.weight.shape[0],), 8)
        if i % 2:
            bits[: len(bits) // 2] = 4
        attach(m, bits, 8, None)
    calibrate(model, calib)
    model.eval()
    legalize(model, load_target("openvino"))
    return model


def _ints(m) -> torch.Tensor:
    return qparams.quant_params(m).int_weight.reshape(m.weight.shape[0], -1).abs().amax(1)


def test_narrowing_fits_seven_bits_and_changes_outputs_by_about_one_step(tiny_resnet, resnet_calib, resnet_example):
    model = _quantized_resnet(tiny_resnet, resnet_calib)
    before = copy.deepcopy(model)
    changes = narrow_int8_weights(model, "openvino")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _QuantMixin)}
    old = dict(before.named_modules())
    int8_x_int8 = {n for n, m in old.items() if isinstance(m, _QuantMixin) and int(m.act_bits) and not m.act_dynamic}
    assert {c.layer for c in changes} == {n for n in int8_x_int8 if bool((_ints(old[n]) > NARROW_QMAX).any())}
    assert "linear.parts.0" not in int8_x_int8  # the 8-bit half of the split head runs weight-only here
    for name, m in layers.items():
        ints, was = _ints(m), _ints(old[name])
        if name not in int8_x_int8:
            assert torch.equal(m.weight, old[name].weight)
            continue
        assert int(ints.max()) <= NARROW_QMAX, name
        small = was <= NARROW_QMAX  # e.g. 4-bit channels raised to 8: left exactly as they were
        assert torch.equal(m.weight[small], old[name].weight[small])
        assert torch.equal(ints[small], was[small])
        # a narrowed channel: its largest value stays the largest (127 steps -> 63 steps of twice the size)
        assert bool((ints[~small] == NARROW_QMAX).all())
        w_new, w_old = m.qweight().detach(), old[name].qweight().detach()
        step = qparams.quant_params(old[name]).scales.view(-1, *[1] * (w_old.dim() - 1))
        assert bool(((w_new - w_old).abs() <= step * 127 / NARROW_QMAX / 2 + 1e-6).all())
    with torch.no_grad():
        a, b = model(resnet_example), before(resnet_example)
    assert not torch.equal(a, b)
    assert float((a - b).abs().max()) < 0.1 * float(b.abs().max())
    assert narrow_int8_weights(model, "openvino") == []  # idempotent


def test_layers_without_static_int8_activations_are_not_narrowed(tiny_resnet, resnet_calib):
    model = _quantized_resnet(tiny_resnet, resnet_calib)
    for m in model.modules():
        if isinstance(m, _QuantMixin):
            m.act_bits.fill_(0)  # weight-only: no u8 x i8 products
    assert narrow_int8_weights(model, "openvino") == []


def test_cpu_flags_decide_vnni():
    assert has_vnni({"avx2", "fma"}) is False
    assert has_vnni({"avx2", "avx_vnni"}) is True
    assert has_vnni({"avx512f", "avx512_vnni"}) is True
    assert "saturating int16" in int8_dot_product({"avx2"})
    assert has_vnni() in (True, False, None)


@pytest.mark.parametrize("target, fix, message", [
    ("executorch", "on", "do not saturate"),
    ("openvino", "sometimes", "overflow_fix must be one of auto, on, off"),
])
def test_bad_overflow_fix_is_refused(tmp_path, target, fix, message):
    with pytest.raises(UserError, match=message):
        run_export(tmp_path / "missing", tmp_path / "out", ExportOptions(target, overflow_fix=fix), quiet=True)
    assert not (tmp_path / "out").exists()
