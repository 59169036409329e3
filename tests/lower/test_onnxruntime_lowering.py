"""ONNX Runtime export: 8-bit weights as int8 (u8 x s8 kernels) unless they must be exact on CPUs without VNNI."""

import onnx
import pytest

from hpqdeploy.config import ExportOptions
from hpqdeploy.lower.cpu import has_vnni
from hpqdeploy.lower.export import run_export

pytest.importorskip("onnxruntime")


def _conv_weight_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if len(t.dims) == 4}


@pytest.fixture(scope="module")
def both_forms(digits_hybrid, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-forms")
    return {fix: run_export(digits_hybrid / "hybrid", root / fix, ExportOptions("onnxruntime", batch_size=16,
                                                                               overflow_fix=fix), quiet=True)
            | {"dir": root / fix} for fix in ("on", "off")}


def test_overflow_fix_chooses_the_weight_encoding(both_forms):
    assert _conv_weight_types(both_forms["on"]["dir"] / "model.onnx") == {"UINT8"}
    assert _conv_weight_types(both_forms["off"]["dir"] / "model.onnx") == {"INT8"}
    assert any("u8 x u8" in n for n in both_forms["on"]["notes"])
    assert any("--overflow-fix on" in n for n in both_forms["off"]["notes"])
    assert both_forms["on"]["options"]["overflow_fix"] == "on"


def test_both_encodings_compute_the_plan(both_forms):
    """u8 x u8 is exact on every CPU; u8 x s8 where the CPU has VNNI (elsewhere it may saturate, which is why
    `auto` picks u8 x u8 there)."""
    on, off = both_forms["on"], both_forms["off"]
    assert on["top1_agreement"] >= 0.95
    assert abs(on["accuracy"] - on["accuracy_pytorch_legalized"]) <= 0.03
    if has_vnni():
        assert off["accuracy"] == on["accuracy"]
        assert off["max_abs_diff"] == pytest.approx(on["max_abs_diff"], abs=1e-5)


def test_auto_follows_this_cpu(digits_hybrid, tmp_path, monkeypatch):
    import hpqdeploy.lower.export as export

    for vnni, types in ((True, {"INT8"}), (False, {"UINT8"})):
        monkeypatch.setattr(export, "has_vnni", lambda vnni=vnni: vnni)
        out = tmp_path / str(vnni)
        run_export(digits_hybrid / "hybrid", out, ExportOptions("onnxruntime", batch_size=16, eval_limit=16),
                   quiet=True)
        assert _conv_weight_types(out / "model.onnx") == types
