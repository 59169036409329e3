"""OpenVINO lowering: the IR holds what the plan asked for (FakeQuantize on every int8 conv, the plan's own 4-bit
integers and scales as compressed MatMul/Gather weights), read back from the files, and runs like PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("openvino")

from conftest import bert_inputs, make_tiny_bert  # noqa: E402

from hpqdeploy.config import ExportOptions
from hpqdeploy.core.quantize import attach, calibrate  # noqa: E402
from hpqdeploy.core.targets import load_target  # noqa: E402
from hpqdeploy.errors import UserError  # noqa: E402
from hpqdeploy.core import qparams  # noqa: E402
from hpqdeploy.lower.base import LoweringContext, get_runtime  # noqa: E402
from hpqdeploy.lower.export import run_export
from hpqdeploy.lower.legalize import legalize  # noqa: E402
from hpqdeploy.lower.openvino_rt import OpenVINORuntime  # noqa: E402

OV = load_target("openvino")


@pytest.fixture(scope="module")
def resnet_export(digits_hybrid, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino") / "ov"
    report = run_export(digits_hybrid / "hybrid", out, ExportOptions("openvino", batch_size=16), quiet=True)
    return out, report


def test_resnet_hybrid_is_int8_fake_quantized_and_agrees(resnet_export):
    out, report = resnet_export
    assert sorted(report["files"]) == ["model.bin", "model.xml"]
    c = report["contents"]
    convs = c["ops"]["Convolution"]
    assert c["activation_fake_quantize"]["Convolution"] == {"total": convs, "fake_quantized": convs}
    assert c["weights_by_op"]["Convolution"] == {"i8": convs}  # weight FakeQuantize stored as i8 constants
    assert set(c["fake_quantize"]["levels"]) == {"256"}
    executed = c["runtime"]["f32"]  # what the CPU plugin runs with the f32 hint
    assert set(executed["Convolution"]) <= {"u8", "i8"}, executed
    assert report["session"]["inference_precision"] == "f32"
    assert report["session"]["precision_requested"] == "f32"
    assert report["top1_agreement"] >= 0.95
    assert abs(report["accuracy"] - report["accuracy_pytorch_legalized"]) <= 0.03


def test_overflow_fix_stores_seven_bit_conv_weights(digits_hybrid, tmp_path):
    """--overflow-fix on: every int8 conv weight read back from the IR fits 7 bits, and the report lists it."""
    import openvino as ov

    report = run_export(digits_hybrid / "hybrid", tmp_path / "ov", ExportOptions("openvino", batch_size=16,
                                                                                 overflow_fix="on"), quiet=True)
    narrowed = {c["layer"] for c in report["legalization"] if c["what"] == "weight range"}
    assert narrowed
    model = ov.Core().read_model(str(tmp_path / "ov" / "model.xml"))
    conv_weights = [op for op in model.get_ops() if op.get_type_name() == "Constant"
                    and op.get_element_type().get_type_name() == "i8" and len(op.get_output_shape(0)) == 4]
    assert conv_weights
    assert max(int(np.abs(op.get_data().astype(np.int32)).max()) for op in conv_weights) <= 63
    assert report["top1_agreement"] >= 0.95
    assert abs(report["accuracy"] - report["accuracy_pytorch_legalized"]) <= 0.03


def test_batch_is_dynamic(resnet_export):
    out, _ = resnet_export
    session = get_runtime("openvino").load(out, threads=1)
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    batch = session(x)
    one = np.concatenate([session(x[i : i + 1]) for i in range(5)])
    assert batch.shape[0] == 5
    np.testing.assert_allclose(batch, one, atol=1e-4)


def test_default_precision_can_be_compiled_for_comparison(resnet_export):
    out, _ = resnet_export
    info = OpenVINORuntime(precision="default").load(out, threads=1).info()
    assert info["precision_requested"] == "default"
    assert info["inference_precision"] == info["cpu_default_precision"]  # bf16 on CPUs with native bf16
    with pytest.raises(UserError):
        OpenVINORuntime(precision="int3")


def _four_bit_bert():
    """Tiny BERT: two whole linear layers and a mixed layer at 4 bits, a mixed 4/8-bit word embedding."""
    model = make_tiny_bert()
    layers = dict(model.named_modules())
    for name in ("hf.bert.encoder.layer.0.attention.self.query", "hf.bert.encoder.layer.1.output.dense"):
        attach(layers[name], torch.full((layers[name].out_features,), 4), 8, None)
    mixed = torch.full((64,), 8)
    mixed[::3] = 4
    attach(layers["hf.bert.encoder.layer.1.attention.self.key"], mixed, 8, None)
    attach(layers["hf.bert.encoder.layer.0.attention.output.dense"], torch.full((64,), 8), 8, None)
    rows = torch.full((100,), 8)
    rows[::2] = 4
    attach(layers["hf.bert.embeddings.word_embeddings"], rows, None, None)
    calibrate(model, [(bert_inputs(4, seed=10 + i), None) for i in range(2)])
    legalize(model, OV)
    return model.eval()


def _lower(model, example, tmp_path, modality="text"):
    rt = get_runtime("openvino")
    lowered = rt.lower(LoweringContext(model, OV, example, [], modality), tmp_path)
    return rt, lowered


def _unpack_i4(packed: np.ndarray) -> np.ndarray:
    """OpenVINO packs two i4 values a byte, the first in the low nibble."""
    b = packed.view(np.uint8)
    nibbles = np.stack([b & 0xF, b >> 4], axis=-1).reshape(-1).astype(np.int8)
    return (nibbles ^ 8) - 8


def test_bert_four_bit_layers_are_compressed_with_the_plans_numbers(tmp_path):
    import openvino as ov

    model = _four_bit_bert()
    example = bert_inputs(2, seed=4)
    rt, lowered = _lower(model, example, tmp_path)
    contents = rt.inspect(tmp_path)
    assert contents["inputs"] == {"input_ids": "i64[?,12]", "attention_mask": "i64[?,12]"}
    four_bit = {n: m for n, m in model.named_modules() if hasattr(m, "w_bits") and int(m.w_bits.max()) == 4}
    assert len(four_bit) == 4  # 2 whole layers + the 4-bit parts of the split key projection and embedding
    assert contents["weights"]["i4"] == sum(m.weight.numel() for m in four_bit.values())
    on_i4 = {(w["op"], w["layer"]) for w in contents["compressed_weights"] if w["weight"] == "i4"}
    assert on_i4 == {("MatMul", "hf.bert.encoder.layer.0.attention.self.query"),
                     ("MatMul", "hf.bert.encoder.layer.1.output.dense"),
                     ("MatMul", "hf.bert.encoder.layer.1.attention.self.key.parts.1"),
                     ("Gather", "hf.bert.embeddings.word_embeddings.parts.1")}
    executed = contents["runtime"]["f32"]
    assert executed["FullyConnected"].get("i4") == 3 and executed["Gather"].get("i4") == 1, executed
    # the IR's integers and scales are the plan's, bit for bit
    ir = {op.get_friendly_name(): op for op in ov.Core().read_model(str(tmp_path / "model.xml")).get_ops()}
    query = four_bit["hf.bert.encoder.layer.0.attention.self.query"]
    p = qparams.quant_params(query)
    const = ir["hf.bert.encoder.layer.0.attention.self.query.weight/i4"]
    np.testing.assert_array_equal(_unpack_i4(const.get_data()).reshape(64, 64), p.int_weight.numpy())
    scales = ir["hf.bert.encoder.layer.0.attention.self.query.weight/scale"].get_data()
    np.testing.assert_array_equal(scales.ravel(), p.scales.numpy().ravel())
    assert any("compressed constants" in n for n in lowered.notes)

    session = rt.load(tmp_path, threads=1)
    assert session.info()["inference_precision"] == "f32"
    for seed, batch in ((4, 2), (7, 5)):
        x = bert_inputs(batch, seed=seed)
        with torch.no_grad():
            ref = model(**x).numpy()
        got = session({k: v.numpy() for k, v in x.items()})
        np.testing.assert_allclose(got, ref, atol=2e-3)


def test_grouped_four_bit_weights(tmp_path):
    """Per-group weights (group 32) take the Reshape form; outputs match the fake-quant model. On CPUs with int8
    dot products the plugin would quantize these layers' activations on the fly (max error ~4e-3 here): f32 must
    turn that off, the plugin's default may keep it and says which it did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    attach(model[0], torch.full((48,), 4), None, 32)
    attach(model[2], torch.full((10,), 8), None, 16)
    x = torch.randn(3, 64)
    rt, _ = _lower(model, x, tmp_path, modality="image")
    contents = rt.inspect(tmp_path)
    assert contents["weights"] == {"i4": 64 * 48, "i8": 48 * 10}
    assert contents["ops"]["Reshape"] >= 2
    with torch.no_grad():
        ref = model(x).numpy()
    session = rt.load(tmp_path)
    assert session.info()["dynamic_activation_quantization_group"] == 0
    np.testing.assert_allclose(session(x.numpy()), ref, atol=1e-4)

    import openvino as ov
    plugin_default = int(ov.Core().get_property("CPU", "DYNAMIC_QUANTIZATION_GROUP_SIZE"))
    info = OpenVINORuntime(precision="default").load(tmp_path).info()
    assert info["dynamic_activation_quantization_group"] == plugin_default
    assert contents["runtime"]["cpu_default_dynamic_activation_quantization_group"] == plugin_default


def test_low_bit_conv_and_missing_ir_are_user_errors(tiny_resnet, resnet_example, tmp_path):
    model = copy.deepcopy(tiny_resnet)
    attach(model.conv1, torch.full((16,), 4), 8, None)
    with pytest.raises(UserError, match="conv1 has 4-bit"):
        _lower(model, resnet_example, tmp_path, modality="image")
    with pytest.raises(UserError, match="no OpenVINO IR"):
        get_runtime("openvino").load(tmp_path / "nothing")
