"""The QDQ ONNX lowering: integers really stored, 4-bit layers really 4-bit, outputs equal to the fake-quant model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hpqdeploy.errors import UserError
from hpqdeploy.lower.legalize import SplitLinear, legalize
from hpqdeploy.lower.onnx_qdq import (ONNXRUNTIME, ONNXRUNTIME_NO_VNNI, TENSORRT, export_qdq, inspect_onnx,
                                      swap_in_stand_ins)
from hpqdeploy.core.quantize import QConv2d, QLinear, attach, calibrate, quantizable_layers
from hpqdeploy.core.targets import load_target
from hpqdeploy.lower.onnxruntime_rt import OrtSession

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FOUR_BIT = "layer.0.intermediate.dense"  # 64 -> 128: two groups of 32 (ONNX Runtime); raised to 8-bit on TensorRT
MIXED = "layer.1.output.dense"  # 128 -> 64, half the output channels 4-bit: split into an 8-bit and a 4-bit part


def _quantize_bert(model, calib):
    for name, m in quantizable_layers(model).items():
        bits = torch.full((m.weight.shape[0],), 8)
        if name.endswith(FOUR_BIT):
            bits[:] = 4
        elif name.endswith(MIXED):
            bits[::2] = 4
        elif name.endswith("word_embeddings"):
            bits[40:] = 4
        attach(m, bits, 8, None)
    calibrate(model, calib)
    return model.eval()


def _quantize_resnet(model, calib):
    for i, (name, m) in enumerate(quantizable_layers(model).items()):
        bits = torch.full((m.weight.shape[0],), 8)
        if i % 2:
            bits[: len(bits) // 2] = 4  # legalization raises 4-bit convs to 8-bit
        attach(m, bits, 8, None)
    calibrate(model, calib)
    return model.eval()


@pytest.fixture
def bert_ort(tiny_bert, bert_calib, bert_example, tmp_path):
    model = _quantize_bert(tiny_bert, bert_calib)
    legalize(model, load_target("onnxruntime"))
    result = export_qdq(model, {k: v[:1] for k, v in bert_example.items()}, tmp_path / "model.onnx", ONNXRUNTIME)
    return model, result


def _run(path, inputs, **kw):
    session = OrtSession(path, threads=1, **kw)
    return session({k: v.numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.numpy())


@pytest.mark.parametrize("flavor, dtype", [(ONNXRUNTIME, "int8"), (ONNXRUNTIME_NO_VNNI, "uint8")])
def test_int8_weights_are_stored_as_integers(tiny_resnet, resnet_calib, resnet_example, tmp_path, flavor, dtype):
    model = _quantize_resnet(tiny_resnet, resnet_calib)
    legalize(model, load_target("onnxruntime"))
    result = export_qdq(model, resnet_example, tmp_path / "model.onnx", flavor)
    proto = onnx.load(str(result.path))
    inits = {t.name: t for t in proto.graph.initializer}
    assert {layer.form for layer in result.layers.values() if layer.kind == "conv"} == {"dq_int8"}
    for name, layer in result.layers.items():
        assert f"{name}.weight" not in inits  # the float weight is gone ...
        if layer.form != "dq_int8":
            continue  # the 4-bit part of the split classifier: MatMulNBits, tested below
        stored = inits[f"{name}.weight_quantized"]  # ... replaced by its 8-bit codes
        assert stored.data_type == getattr(onnx.TensorProto, dtype.upper())
        assert list(stored.dims) == list(layer.params.int_weight.T.shape if layer.kind == "linear"
                                         else layer.params.int_weight.shape)
    weights = inspect_onnx(result.path)["weights"]
    assert weights[dtype] > 20 * weights.get("float32", 0)  # only biases, scales and the like stay float
    assert result.path.stat().st_size < 0.4 * sum(p.numel() * 4 for p in tiny_resnet.parameters())


def test_resnet_agrees_with_fake_quant_model(tiny_resnet, resnet_calib, tmp_path):
    model = _quantize_resnet(tiny_resnet, resnet_calib)
    legalize(model, load_target("onnxruntime"))
    x = torch.cat([b for b, _ in resnet_calib])
    result = export_qdq(model, x[:1], tmp_path / "model.onnx", ONNXRUNTIME)
    with torch.no_grad():
        ref = model(x).numpy()
    got = _run(result.path, x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    # BatchNorm folding and ORT's integer kernels may flip an activation code at a rounding tie, no more
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_bert_four_bit_linear_layers_are_matmulnbits(bert_ort):
    model, result = bert_ort
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, QLinear) and int(m.w_bits.max()) == 4}
    assert any(n.endswith(FOUR_BIT) for n in four_bit) and any(MIXED in n for n in four_bit)  # incl. a split part
    assert any(isinstance(m, SplitLinear) for m in model.modules())
    info = inspect_onnx(result.path)
    assert info["ops"]["com.microsoft.MatMulNBits"] >= len(four_bit)  # + 8-bit weight-only parts, at fp32 accuracy
    assert info["weights"]["uint4 (MatMulNBits)"] == sum(m.weight.numel() for m in four_bit.values())
    assert info["quantized_ops"]["MatMulNBits w:uint4/block32 a:float"] == len(four_bit)
    assert "int4 (GatherBlockQuantized)" in info["weights"]  # the 4-bit rows of the word embeddings
    assert info["weights"]["float32"] < 0.05 * sum(info["weights"].values())
    proto = onnx.load(str(result.path))
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"]) in ((4, 32), (8, 128)) and attrs["accuracy_level"] == 1


def test_bert_outputs_equal_the_fake_quant_model(bert_ort, bert_example):
    model, result = bert_ort
    with torch.no_grad():
        ref = model(**bert_example).numpy()
    got = _run(result.path, bert_example)  # ORT with all its graph optimizations and integer kernels
    assert np.abs(got - ref).max() <= 1e-5 + 1e-3 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_tensorrt_flavor_writes_int4_blocks_and_symmetric_int8(tiny_bert, bert_calib, bert_example, tmp_path):
    model = _quantize_bert(tiny_bert, bert_calib)
    legalize(model, load_target("tensorrt"))
    result = export_qdq(model, {k: v[:1] for k, v in bert_example.items()}, tmp_path / "model.onnx", TENSORRT)
    info = inspect_onnx(result.path)
    assert info["opset"] == 21 and "com.microsoft.MatMulNBits" not in info["ops"]
    assert info["weights"]["int4"] > 0 and "uint8" not in info["weights"]
    assert any(k.startswith("MatMul w:int4/block128") for k in info["quantized_ops"])
    assert any(k.startswith("MatMul w:int8 a:int8") for k in info["quantized_ops"])
    # the lowering is exact for the symmetric numerics it was asked for: compare with the torch stand-ins
    standins = copy.deepcopy(model)
    swap_in_stand_ins(standins, TENSORRT)
    with torch.no_grad():
        ref = standins(**bert_example).numpy()
    got = _run(result.path, bert_example, exact_qdq=True)
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_a_four_bit_conv_has_no_onnx_form(tiny_resnet, resnet_calib, resnet_example, tmp_path):
    model = _quantize_resnet(tiny_resnet, resnet_calib)
    legalize(model, load_target("onnxruntime"))
    next(m for m in model.modules() if isinstance(m, QConv2d)).w_bits.fill_(4)  # as if legalized for another target
    with pytest.raises(UserError, match="4-bit per-channel conv weights have no onnxruntime form"):
        export_qdq(model, resnet_example, tmp_path / "model.onnx", ONNXRUNTIME)
    assert not (tmp_path / "model.onnx").exists()


def test_dynamic_activations_are_refused(tiny_resnet, resnet_calib, resnet_example, tmp_path):
    model = _quantize_resnet(tiny_resnet, resnet_calib)
    legalize(model, load_target("onnxruntime"))
    next(m for m in model.modules() if isinstance(m, QConv2d)).act_dynamic = True
    with pytest.raises(UserError, match="dynamic"):
        export_qdq(model, resnet_example, tmp_path / "model.onnx", ONNXRUNTIME)
