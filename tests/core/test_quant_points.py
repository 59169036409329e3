"""Quantization points between layers: where they go, that PyTorch computes what the runtimes compute there, and
that they survive saving, loading and every lowering."""

from __future__ import annotations

import json
import operator

import pytest
import torch

from hpqdeploy import artifact

from hpqdeploy.core import quant_points
from hpqdeploy.core.quantize import TensorQuant, attach, calibrate, quantizable_layers
from hpqdeploy.core.targets import QUANTIZED_OP_KINDS, load_target, target_names
from hpqdeploy.errors import UserError


def _quantized(model, act_bits=8):
    for layer in quantizable_layers(model).values():
        attach(layer, torch.full((layer.weight.shape[0],), 8), act_bits, None)
    return model


def test_every_residual_add_reads_and_writes_quantized_tensors(tiny_resnet, resnet_calib):
    points = quant_points.insert_points(_quantized(tiny_resnet))
    gm = points.model
    calibrate(gm, resnet_calib)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) == 3 and points.ops == {"add": 3, "avg_pool": 1}

    def quantized(node):
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), TensorQuant)

    for add in adds:
        for a in add.args:  # a point's output, or reached from one through ops that vanish in export (Identity)
            src, direct = quant_points.walk_back(gm, a)
            assert quantized(a) or (direct and quantized(src)), add.format_node()
        (relu,) = add.users  # the output is quantized after its ReLU, as ORT's ReLU-into-Q fusion needs
        (q,) = relu.users
        assert quantized(q)
    # one quantizer per tensor: the block input feeds its first conv and its shortcut through the same point
    assert points.layer_ties["layer1.0.conv1"] == "relu"
    assert gm.get_submodule("layer1.0.conv1").reads_point_directly
    # the classifier reads the pooled tensor through a flatten: tied to the pooling point, not directly
    assert points.layer_ties["linear"] == "adaptive_avg_pool2d"
    assert not gm.get_submodule("linear").reads_point_directly
    # the stage-changing shortcut (slice, zero-pad, select) keeps the grid: a mirror point shares its source's range
    assert set(points.mirrors.values()) <= set(points.points)
    for name, source in points.mirrors.items():
        assert torch.equal(points.points[name].act_range, points.points[source].act_range)


def test_a_tied_layer_computes_exactly_what_its_own_quantizer_would(tiny_resnet, resnet_calib, resnet_example):
    points = quant_points.insert_points(_quantized(tiny_resnet))
    gm = points.model.eval()
    calibrate(gm, resnet_calib)
    with torch.no_grad():
        tied = gm(resnet_example)
        for name in points.layer_ties:
            gm.get_submodule(name).tie_to(None)  # now each re-quantizes its (already quantized) input itself
        untied = gm(resnet_example)
    assert torch.allclose(tied, untied, atol=1e-5), (tied - untied).abs().max()


def test_models_fx_cannot_trace_keep_their_layer_quantizers(tiny_bert):
    assert quant_points.insert_points(_quantized(tiny_bert)) is None


def test_no_points_without_static_activations(tiny_resnet):
    assert quant_points.insert_points(tiny_resnet, ops=()) is None


@pytest.mark.parametrize("name", target_names())
def test_every_target_quantizes_what_its_runtime_quantizer_quantizes(name):
    """The op kinds each target quantizes between layers are ones its runtime's own quantizer quantizes (read from
    that tool's own tables where it is installed)."""
    ops = load_target(name).quantized_ops
    assert set(ops) <= set(QUANTIZED_OP_KINDS)
    tables = {"onnxruntime": _ort_ops, "tensorrt": _ort_ops, "openvino": _nncf_ops, "executorch": _xnnpack_ops}
    if name not in tables:
        pytest.skip(f"no quantizer table known for {name}")
    table, wanted = tables[name]()
    missing = [op for op in ops if not wanted[op] & table]
    assert not missing, f"{name} quantizes {missing}, which its runtime's quantizer does not"


def _ort_ops():
    registry = pytest.importorskip("onnxruntime.quantization.registry")
    return set(registry.QLinearOpsRegistry), {"add": {"Add"}, "avg_pool": {"GlobalAveragePool", "AveragePool"},
                                              "cat": {"Concat"}}


def _nncf_ops():
    pytest.importorskip("nncf")
    from nncf.common.hardware.setups.cpu import CPU_SETUP

    return {str(d.type) for d in CPU_SETUP}, {"add": {"add"}, "avg_pool": {"avg_pool"}, "cat": {"concat"}}


def _xnnpack_ops():
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import OP_TO_ANNOTATOR

    return set(OP_TO_ANNOTATOR), {"add": {"add", "add_relu"}, "avg_pool": {"adaptive_avg_pool2d"}, "cat": {"cat"}}


def test_points_are_saved_and_restored(digits_quant):
    art = artifact.load(digits_quant)
    recorded = art.plan["activation_points"]
    assert recorded["points"] and recorded["layer_ties"]
    gm = art.model.module
    for name, (lo, hi) in recorded["ranges"].items():
        tq = gm.get_submodule(f"{quant_points.CONTAINER}.{name}")
        assert lo <= hi and torch.allclose(tq.act_range, torch.tensor([lo, hi]))
    for layer, point in recorded["layer_ties"].items():
        assert gm.get_submodule(layer).act_source is gm.get_submodule(f"{quant_points.CONTAINER}.{point}")
    again = artifact.load(digits_quant).model.module
    x = torch.randn(4, *art.model.example_inputs.shape[1:])
    with torch.no_grad():
        assert torch.equal(gm(x), again(x))


def test_a_plan_whose_points_differ_from_the_model_is_a_one_line_error(digits_quant, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(digits_quant, edited)
    plan = json.loads((edited / "plan.json").read_text())
    plan["activation_points"]["points"].append("no_such_node")
    (edited / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="quantization points do not match the plan") as exc:
        artifact.load(edited)
    assert "\n" not in str(exc.value)


def _pytorch_quantizers(module) -> int:
    """Activation quantizers of a loaded model that write a Q/DQ (or FakeQuantize) of their own: every point, and
    every static layer input not read straight from a point."""
    from hpqdeploy.core.quantize import _QuantMixin

    own = [m for m in module.modules() if isinstance(m, _QuantMixin) and int(m.act_bits) and not m.act_dynamic
           and not m.reads_point_directly]
    return len(own) + sum(isinstance(m, TensorQuant) for m in module.modules())


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_runtime_quantizes_exactly_the_tensors_pytorch_quantizes(digits_quant, tmp_path, runtime):
    """One Q/DQ pair (ONNX) or FakeQuantize (OpenVINO) on activations per PyTorch quantizer, and every layer the
    plan runs in int8 read back from the runtime as an integer kernel."""
    from hpqdeploy.config import ExportOptions
    from hpqdeploy.lower.base import get_runtime
    from hpqdeploy.lower.export import run_export

    missing = get_runtime(runtime).missing()
    if missing:
        pytest.skip(f"{runtime}: {missing} is not installed here")
    report = run_export(digits_quant, tmp_path / runtime, ExportOptions(runtime, eval_limit=32), quiet=True)
    expected = _pytorch_quantizers(artifact.load(digits_quant).model.module)
    contents = report["contents"]
    if runtime == "onnxruntime":
        import onnx

        graph = onnx.load(str(tmp_path / runtime / "model.onnx")).graph
        found = sum(n.op_type == "QuantizeLinear" for n in graph.node)
    else:
        found = contents["fake_quantize"]["count"]
    assert found == expected
    fast = contents["fast_path"]
    assert fast["quantized"] > 0 and fast["integer"] == fast["quantized"] and not fast["float"], fast


def test_the_onnxruntime_read_back_sees_a_layer_left_in_float(digits_quant, tmp_path):
    """Read against the graph as written (DequantizeLinear -> Conv, no fusion), every static int8 convolution shows
    as a float fallback: the read-back can tell the two apart."""
    onnx = pytest.importorskip("onnx")
    from hpqdeploy.config import ExportOptions
    from hpqdeploy.lower.export import run_export
    from hpqdeploy.lower.onnxruntime_rt import fast_path, static_int8_layers

    run_export(digits_quant, tmp_path / "ort", ExportOptions("onnxruntime", eval_limit=32), quiet=True)
    graph = onnx.load(str(tmp_path / "ort" / "model.onnx")).graph
    layers = static_int8_layers(graph)
    written = fast_path(layers, graph)
    convs = [name for name in layers if written["by_layer"][name] != "MatMulIntegerToFloat"]
    assert convs and sorted(convs) == written["float"]
    assert all(written["by_layer"][name] == "Conv (float)" for name in convs)
