"""One lowering scenario, written once and run for every runtime: a tiny compressed model is exported, evaluated
inside the runtime, and must agree with PyTorch; the artifact must really hold what the plan asked for."""

from __future__ import annotations

import json

import pytest

from hpqdeploy.config import ExportOptions
from hpqdeploy.lower.base import get_runtime, runtime_names
from hpqdeploy.lower.export import run_export

RUNTIMES = ["onnxruntime", "openvino", "executorch", "tensorrt"]


def _runtime_or_skip(name):
    if name not in runtime_names():
        pytest.skip(f"no lowering registered for {name}")
    rt = get_runtime(name)
    missing = rt.missing()
    if missing:
        pytest.skip(f"{name}: {missing} is not installed here")
    return rt


@pytest.mark.parametrize("target", RUNTIMES)
@pytest.mark.parametrize("source", ["baseline", "hybrid"])
def test_lowered_artifact_agrees_with_pytorch(digits_hybrid, tmp_path, target, source):
    _runtime_or_skip(target)
    out = tmp_path / f"{source}-{target}"
    report = run_export(digits_hybrid / source, out, ExportOptions(target, batch_size=16), quiet=True)
    assert (out / "export.json").is_file()
    assert json.loads((out / "export.json").read_text())["runtime"] == target
    assert report["eval_examples"] == 96
    assert report["top1_agreement"] >= 0.95, report
    assert abs(report["accuracy_delta_points"]) <= 5.0
    assert report["bytes_on_disk"] > 0
    if source == "hybrid":
        # convolutions run int8 on every runtime here: the artifact must really contain 8-bit weights
        weights = report["contents"]["weights"]
        assert any(k.startswith(("int8", "i8", "u8", "uint8")) for k in weights), weights
        assert any(c["what"] == "weight bits" for c in report["legalization"])  # 4-bit convs were raised
        if target != "tensorrt":  # read back from the runtime: every int8 layer runs in its integer kernels
            fast = report["contents"]["fast_path"]
            assert fast["quantized"] > 0 and fast["integer"] == fast["quantized"] and not fast["float"], fast


def test_a_quantized_layer_the_runtime_runs_in_float_is_a_warning_and_a_note():
    from hpqdeploy.lower.export import _warn_float_fallbacks

    notes: list[str] = []
    with pytest.warns(UserWarning, match=r"1 of 3 int8 layer\(s\) run in float on onnxruntime: linear"):
        _warn_float_fallbacks("onnxruntime", {"quantized": 3, "integer": 2, "float": ["linear"]}, notes)
    assert notes == ["2 of 3 int8 layer(s) run in onnxruntime's integer kernels (read back from the runtime)"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_float_fallbacks("openvino", {"quantized": 3, "integer": 3, "float": []}, notes)
