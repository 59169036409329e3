"""TensorRT lowering: the static Q/DQ rule check (accepts a good model, rejects each bad case), the deferred build
command, and the engine build itself where TensorRT and a GPU exist (skipped, with the reason, elsewhere)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from hpqdeploy.core.quantize import attach, calibrate, quantizable_layers
from hpqdeploy.core.targets import load_target
from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import LoweringContext
from hpqdeploy.lower.legalize import legalize
from hpqdeploy.lower.onnx_qdq import ONNXRUNTIME, export_qdq
from hpqdeploy.lower.tensorrt_rt import BUILD_SCRIPT, ENGINE_FILE, TensorRT, check_tensorrt_qdq, engine_unavailable

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

NO_ENGINE = engine_unavailable()


def _quantized(model, calib, low_bit_layer: str | None = None, target: str = "tensorrt"):
    for name, m in quantizable_layers(model).items():
        bits = torch.full((m.weight.shape[0],), 8)
        if low_bit_layer and name.endswith(low_bit_layer):
            bits[:] = 4
        attach(m, bits, 8, None)
    calibrate(model, calib)
    legalize(model, load_target(target))
    return model.eval()


@pytest.fixture
def resnet_ctx(tiny_resnet, resnet_calib, resnet_example):
    model = _quantized(tiny_resnet, resnet_calib)
    return LoweringContext(model, load_target("tensorrt"), resnet_example, resnet_calib, "image", (1, 8))


@pytest.fixture
def lowered(resnet_ctx, tmp_path):
    result = TensorRT().lower(resnet_ctx, tmp_path)
    return tmp_path, result


@pytest.fixture
def good(lowered):
    return onnx.load(str(lowered[0] / "model.onnx"))


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _set_const(model, name, array):
    """Replace the constant `name` (initializer or Constant node) by `array`."""
    tensor = numpy_helper.from_array(array, name)
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(tensor)
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            node.attribute[0].t.CopyFrom(tensor)
            return
    raise KeyError(name)


def test_the_lowered_model_obeys_the_rules(good):
    assert check_tensorrt_qdq(good) == []
    zps = [n.input[2] for n in _nodes(good, "QuantizeLinear") + _nodes(good, "DequantizeLinear")]
    assert zps and all(zps)  # every Q/DQ carries an explicit (int8, zero) zero point


def test_uint8_zero_point_is_rejected(good):
    bad = copy.deepcopy(good)
    _set_const(bad, _nodes(bad, "QuantizeLinear")[0].input[2], np.array(128, np.uint8))
    assert any("uint8" in v for v in check_tensorrt_qdq(bad))


def test_nonzero_zero_point_is_rejected(good):
    bad = copy.deepcopy(good)
    weight_dq = next(n for n in _nodes(bad, "DequantizeLinear") if n.input[0].endswith("_quantized"))
    zp = numpy_helper.to_array(next(t for t in bad.graph.initializer if t.name == weight_dq.input[2])).copy()
    zp[0] = 3
    _set_const(bad, weight_dq.input[2], zp)
    assert any("zero point must be 0" in v for v in check_tensorrt_qdq(bad))


def test_contrib_op_is_rejected(good):
    bad = copy.deepcopy(good)
    node = _nodes(bad, "Conv")[0]
    node.domain, node.op_type = "com.microsoft", "FusedConv"
    assert any("com.microsoft.FusedConv" in v for v in check_tensorrt_qdq(bad))


def test_onnxruntime_flavor_breaks_the_rules(tiny_bert, bert_calib, bert_example, tmp_path):
    model = _quantized(tiny_bert, bert_calib, "layer.0.intermediate.dense", target="onnxruntime")
    result = export_qdq(model, {k: v[:1] for k, v in bert_example.items()}, tmp_path / "m.onnx", ONNXRUNTIME)
    violations = check_tensorrt_qdq(onnx.load(str(result.path)))
    assert any("uint8" in v for v in violations)
    assert any("com.microsoft.GatherBlockQuantized" in v for v in violations)
    assert any("com.microsoft.MatMulNBits" in v for v in violations)


def test_too_low_opset_is_rejected(good):
    bad = copy.deepcopy(good)
    bad.opset_import[0].version = 12
    assert any("opset 12 is below 13" in v for v in check_tensorrt_qdq(bad))


def test_int4_blocks_need_opset_21_and_a_matmul(tiny_bert, bert_calib, bert_example, tmp_path):
    # 128 inputs: one INT4 block of 128 (TensorRT's group size)
    model = _quantized(tiny_bert, bert_calib, low_bit_layer="layer.1.output.dense")
    ctx = LoweringContext(model, load_target("tensorrt"), {k: v[:1] for k, v in bert_example.items()}, bert_calib,
                          "text", (1, 4))
    TensorRT().lower(ctx, tmp_path)
    good = onnx.load(str(tmp_path / "model.onnx"))
    assert check_tensorrt_qdq(good) == []
    blocked = [n for n in _nodes(good, "DequantizeLinear") if any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 1 and good.opset_import[0].version == 21
    old = copy.deepcopy(good)
    old.opset_import[0].version = 17
    assert any("needs opset 21" in v for v in check_tensorrt_qdq(old))
    misplaced = copy.deepcopy(good)
    misplaced.graph.node.append(helper.make_node("Relu", [blocked[0].output[0]], ["stray"]))
    assert any("must feed MatMul/Gemm" in v for v in check_tensorrt_qdq(misplaced))


def test_wrong_channel_axis_is_rejected(good):
    bad = copy.deepcopy(good)
    conv_weight = next(n for n in _nodes(bad, "DequantizeLinear") if n.input[0].endswith("conv1.weight_quantized"))
    next(a for a in conv_weight.attribute if a.name == "axis").i = 1
    assert any("not the output channel" in v for v in check_tensorrt_qdq(bad))


class _WithDeterminant(nn.Module):
    """A model TensorRT cannot take: ONNX Det."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.linalg.det(y[:, :, :2, :2])


def test_lowering_refuses_an_op_tensorrt_cannot_take(resnet_calib, resnet_example, tmp_path):
    model = _quantized(_WithDeterminant(), resnet_calib)
    ctx = LoweringContext(model, load_target("tensorrt"), resnet_example, resnet_calib, "image", (1, 8))
    with pytest.raises(UserError, match="Det is not an op TensorRT parses") as err:
        TensorRT().lower(ctx, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(NO_ENGINE is None, reason="TensorRT and a GPU are present: the engine is built instead")
def test_deferred_build_writes_the_command(lowered):
    out, result = lowered
    script = (out / BUILD_SCRIPT).read_text()
    assert "trtexec --onnx=model.onnx --saveEngine=model.plan --stronglyTyped" in script
    assert "--minShapes=input:1x3x16x16 --optShapes=input:1x3x16x16 --maxShapes=input:8x3x16x16" in script
    assert "8.5" in script  # says which flags differ on TensorRT 8.5
    assert any("engine build deferred to the device" in n for n in result.notes)
    assert not (out / ENGINE_FILE).exists()
    session = TensorRT().load(out)
    assert session.info()["note"].startswith("checked in ONNX Runtime")
    assert TensorRT().inspect(out)["tensorrt_rules"] == {"passed": True, "violations": []}


@pytest.mark.skipif(NO_ENGINE is not None, reason=f"TensorRT engine build needs tensorrt and a CUDA GPU: {NO_ENGINE}")
def test_engine_is_built_and_runs(lowered, resnet_ctx, resnet_calib):
    out, result = lowered
    assert (out / ENGINE_FILE).stat().st_size > 0
    session = TensorRT().load(out)
    assert session.info()["runtime"] == "tensorrt"
    x = torch.cat([b for b, _ in resnet_calib])
    with torch.no_grad():
        ref = resnet_ctx.model(x).numpy()
    got = session(x.numpy())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
