"""`hpqdeploy report`: results found and linked, numbers carried through exactly, honest gaps, pictures, atomic output.

The result directories are hand-written here in the shape `train`/`compress`, `export` and `profile` write them
(cut down to the fields the report reads), so every expected number is known.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from hpqdeploy.errors import UserError  # noqa: E402
from hpqdeploy.reporting import plots, run_report  # noqa: E402
from hpqdeploy.reporting.model_plots import layer_rows  # noqa: E402
from hpqdeploy.reporting.plots import pareto_front  # noqa: E402
from hpqdeploy.reporting.rows import legalization_summary  # noqa: E402
from conftest import TESTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FP32_BYTES = 1_081_000
SPEC = {"family": "cifar_resnet", "name": "resnet8", "args": {"num_classes": 10}}
DATA = {"name": "cifar10", "data_dir": "/data/cifar10", "calib_size": 512, "train_limit": None, "eval_limit": None}
NO_METER = "power: no meter found (test): no RAPL zone"


def _write(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob, indent=2))


def _runs(bits: dict[int, int]) -> list[dict]:
    out, start = [], 0
    for b, n in bits.items():
        out.append({"bits": b, "channels": list(range(start, start + n))})
        start += n
    return out


def _layer(out_channels: int, bits: dict[int, int]) -> dict:
    return {"op": "Conv2d", "out_channels": out_channels, "bits": _runs(bits), "group_size": None, "act_bits": 8,
            "act_mode": "static", "act_range": [-1.0, 1.0], "clip": [1.0] * out_channels,
            "scales": [0.01] * out_channels}


def write_compressed(d: Path, method: str, accuracy: float, params: int, macs: int, weight_bytes: int,
                     pruned: bool, quantized: bool, low_bit_share: float | None) -> None:
    plan = {"model": SPEC, "method": method, "data": DATA, "target": None if method == "baseline" else "generic",
            "channel_multiple": 8, "pruning": [], "quantization": {}}
    if pruned:
        plan["pruning"] = [
            {"name": "layer1.0.conv1", "kind": "channels", "units": 16, "kept": 8, "unit_channels": 1,
             "sensitivity": 0.024, "removed": list(range(8)), "ratio": 0.5},
            {"name": "layer2.0.conv2", "kind": "channels", "units": 32, "kept": 24, "unit_channels": 1,
             "sensitivity": 3.1, "removed": list(range(8)), "ratio": 0.25},
        ]
    if quantized:
        c1, c2, c3 = (8, 24, 24) if pruned else (16, 32, 32)
        plan["quantization"] = {"layer1.0.conv1": _layer(c1, {8: c1}),
                                "layer2.0.conv2": _layer(c2, {8: c2 // 3, 4: c2 - c2 // 3}),
                                "layer2.1.conv2": _layer(c3, {8: 8, 4: c3 - 8}),
                                "linear": _layer(10, {8: 10})}
        plan["layer_sensitivity"] = {"layer1.0.conv1": 0.0029, "layer2.0.conv2": 0.0098, "layer2.1.conv2": 0.00048,
                                     "linear": 0.0128}
    metrics = {"method": method, "accuracy": accuracy, "eval_loss": 0.4, "eval_examples": 10000, "params": params,
               "macs": macs, "bytes": {"total": weight_bytes, "quantized_weights": 0, "scales": 0,
                                       "float": weight_bytes},
               "fp32_bytes": FP32_BYTES, "compression": round(FP32_BYTES / weight_bytes, 3)}
    if method != "baseline":
        metrics["baseline"] = {"accuracy": 0.8728, "params": 269_722, "macs": 40_934_144, "fp32_bytes": FP32_BYTES}
        metrics["low_bit_share"] = low_bit_share
    _write(d / "metrics.json", metrics)
    _write(d / "plan.json", plan)
    _write(d / "provenance.json", {"command": "hpqdeploy compress ..."} if method == "baseline" else
           {"command": "hpqdeploy compress ...", "baseline": str(d.parent / "baseline")})


def write_export(d: Path, source: Path | str, runtime: str, method: str, accuracy: float, accuracy_pt: float,
                 bytes_on_disk: int, legalization: list[dict] | None = None, mixed: str = "split") -> None:
    _write(d / "export.json", {
        "target": runtime, "runtime": runtime, "source": str(source), "method": method,
        "files": {"model.onnx": bytes_on_disk}, "bytes_on_disk": bytes_on_disk, "legalization": legalization or [],
        "mixed": mixed, "notes": [], "session": {}, "contents": {}, "accuracy": accuracy,
        "accuracy_pytorch": accuracy_pt, "accuracy_pytorch_legalized": accuracy_pt, "accuracy_delta_points": 0.0,
        "top1_agreement": 0.99, "max_abs_diff": 0.01, "eval_examples": 10000, "lower_seconds": 1.0, "threads": 1,
        "command": "hpqdeploy export ...",
        "options": {"target": runtime, "mixed": mixed, "batch_size": 32, "eval_limit": None, "calib_batches": 8,
                    "threads": 1, "data_dir": None, "overflow_fix": "auto"}})


def write_profile(d: Path, artifact: Path, runtime: str, method: str, batch: int, p50: float, p99: float,
                  throughput: float, joules: float | None) -> None:
    reason = None if joules is not None else NO_METER
    _write(d / "profile.json", {
        "artifact": str(artifact), "artifact_sha256": "0" * 64, "runtime": runtime, "method": method,
        "source": None, "device": {"kind": "x86", "description": "test", "transport": "local"},
        "runner": {"name": runtime}, "settings": {"batch": batch, "threads": 1, "warmup": 5, "iters": 30,
                                                   "min_seconds": 0.0},
        "latency": {"calls": 60, "p50_ms": p50, "p90_ms": p50 * 1.05, "p99_ms": p99, "mean_ms": p50, "min_ms": p50,
                    "max_ms": p99, "throughput_per_s": throughput, "p50_ms_per_repeat": [p50, p50],
                    "p50_spread": 0.002},
        "energy": {"meter": {"meter": "rapl"}, "energy_per_inference_j": joules,
                   "energy_per_inference_j_per_repeat": None if joules is None else [joules, joules],
                   "idle": {"mean_power_w": None if joules is None else 3.5, "reason": reason}, "reason": reason},
        "memory": {"peak_rss_bytes": 123_456_789}, "state": {}, "repeats": [], "command": "hpqdeploy profile ..."})


LEGAL = [
    {"layer": "layer2.0.conv2", "what": "weight bits", "before": "4-bit x16 channels", "after": "8-bit",
     "reason": "onnxruntime runs convolution weights at [8] bits"},
    {"layer": "layer2.1.conv2", "what": "weight bits", "before": "4-bit x16 channels", "after": "8-bit",
     "reason": "onnxruntime runs convolution weights at [8] bits"},
    {"layer": "linear", "what": "layout", "before": "mixed bit widths in one layer",
     "after": "split: 8 x 8-bit, 2 x 4-bit, a long description", "reason": "per-channel mixed precision kept"},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """runs/r8/{baseline,prune,quant,hybrid}, exports/{ort-baseline,ort-hybrid,ort-quant,ov-hybrid} and
    profiles/{ort-baseline-b1,ort-hybrid-b1,ort-hybrid-b8}."""
    root = tmp_path_factory.mktemp("results")
    runs, exports, profiles = root / "runs" / "r8", root / "exports", root / "profiles"
    write_compressed(runs / "baseline", "baseline", 0.8728, 269_722, 40_934_144, FP32_BYTES, False, False, None)
    write_compressed(runs / "prune", "prune", 0.8407, 126_298, 19_628_544, 505_192, True, False, 0.0)
    write_compressed(runs / "quant", "quant", 0.8734, 269_722, 40_934_144, 208_700, False, True, 0.51)
    write_compressed(runs / "hybrid", "hybrid", 0.8417, 126_298, 19_628_544, 99_912, True, True, 0.5)
    write_export(exports / "ort-baseline", runs / "baseline", "onnxruntime", "baseline", 0.8728, 0.8728, 1_104_000)
    write_export(exports / "ort-hybrid", runs / "hybrid", "onnxruntime", "hybrid", 0.8414, 0.8417, 170_123, LEGAL)
    write_export(exports / "ort-quant", runs / "quant", "onnxruntime", "quant", 0.8733, 0.8734, 290_000)
    write_export(exports / "ov-hybrid", runs / "hybrid", "openvino", "hybrid", 0.8284, 0.8417, 282_000)
    write_profile(profiles / "ort-baseline-b1", exports / "ort-baseline", "onnxruntime", "baseline", 1, 0.81, 1.02,
                  1190.5, 0.0123)
    write_profile(profiles / "ort-hybrid-b1", exports / "ort-hybrid", "onnxruntime", "hybrid", 1, 0.3125, 0.5,
                  3050.25, None)
    write_profile(profiles / "ort-hybrid-b8", exports / "ort-hybrid", "onnxruntime", "hybrid", 8, 1.5, 2.25,
                  5200.0, None)
    return root


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report") / "out"
    return run_report([results / "runs", results / "exports", results / "profiles"], out, html=True), out


def _row(rep: dict, runtime: str, run: str) -> dict:
    (model,) = rep["models"]
    return next(r for r in model["runtimes"][runtime] if r["run"] == run)


def _md_row(md: str, section: str, run: str) -> list[str]:
    """The cells of the row for `run` in the table under the heading that contains `section`."""
    part = md.split(section, 1)[1].split("\n### ", 1)[0]
    line = next(line for line in part.splitlines() if line.startswith("| ") and line.split(" | ")[1] == run)
    return [c.strip() for c in line.strip("|").split(" | ")]


def _md_columns(md: str, section: str) -> list[str]:
    part = md.split(section, 1)[1]
    header = next(line for line in part.splitlines() if line.startswith("| method"))
    return [c.strip() for c in header.strip("|").split(" | ")]


def test_exports_and_profiles_are_linked_to_their_runs(report):
    rep, _ = report
    (model,) = rep["models"]
    assert model["label"] == "resnet8 on cifar10"
    assert [r["run"] for r in model["pytorch"]] == ["baseline", "prune", "quant", "hybrid"]
    assert [r["run"] for r in model["runtimes"]["onnxruntime"]] == ["baseline", "quant", "hybrid"]
    assert list(model["runtimes"]) == ["onnxruntime", "openvino"]
    hybrid = _row(rep, "onnxruntime", "hybrid")
    assert hybrid["source_dir"].endswith("runs/r8/hybrid") and hybrid["export_dir"].endswith("exports/ort-hybrid")
    assert sorted((p["batch"], Path(p["path"]).name) for p in hybrid["profiles"]) == [
        (1, "ort-hybrid-b1"), (8, "ort-hybrid-b8")]
    assert _row(rep, "onnxruntime", "quant")["profiles"] == []
    assert _row(rep, "openvino", "hybrid")["profiles"] == []
    assert rep["counts"] == {"compressed": 4, "exports": 4, "profiles": 3} and rep["warnings"] == []


def test_numbers_are_carried_through_exactly(report):
    rep, out = report
    hybrid = _row(rep, "onnxruntime", "hybrid")
    assert hybrid["accuracy_runtime"] == 0.8414 and hybrid["accuracy_pytorch"] == 0.8417
    assert hybrid["params"] == 126_298 and hybrid["macs"] == 19_628_544
    assert hybrid["bytes_on_disk"] == 170_123 and hybrid["plan_weight_bytes"] == 99_912
    assert hybrid["compression_vs_fp32"] == FP32_BYTES / 170_123
    assert hybrid["compression_vs_baseline_export"] == 1_104_000 / 170_123
    assert _row(rep, "openvino", "hybrid")["compression_vs_baseline_export"] is None  # no OpenVINO baseline export
    b1 = next(p for p in hybrid["profiles"] if p["batch"] == 1)
    assert (b1["p50_ms"], b1["p99_ms"], b1["throughput_per_s"]) == (0.3125, 0.5, 3050.25)
    assert json.loads((out / "report.json").read_text())["models"] == json.loads(json.dumps(rep["models"]))

    md = (out / "report.md").read_text()
    cols = _md_columns(md, "### ONNX Runtime")
    cells = dict(zip(cols, _md_row(md, "### ONNX Runtime", "hybrid")))
    assert cells["acc (runtime)"] == "84.14%" and cells["acc (PyTorch)"] == "84.17%"
    assert cells["bytes on disk"] == "170 kB" and cells["plan weight bytes"] == "99.9 kB"
    assert cells["vs baseline export"] == f"{1_104_000 / 170_123:.2f}×"
    assert (cells["p50 ms x86 b1"], cells["p99 ms x86 b1"], cells["inf/s x86 b1"]) == ("0.3125", "0.5", "3050")
    assert (cells["p50 ms x86 b8"], cells["inf/s x86 b8"]) == ("1.5", "5200")
    assert cells["legalization"] == "3: weight bits ×2 → 8-bit; layout ×1"
    pt = dict(zip(_md_columns(md, "### PyTorch"), _md_row(md, "### PyTorch", "prune")))
    assert pt["accuracy"] == "84.07%" and pt["Δacc (pt)"] == "-3.21" and pt["params"] == "126.3 k"


def test_missing_values_are_dashes_and_missing_energy_gives_the_reason(report):
    rep, out = report
    md = (out / "report.md").read_text()
    cols = _md_columns(md, "### ONNX Runtime")
    hybrid = dict(zip(cols, _md_row(md, "### ONNX Runtime", "hybrid")))
    baseline = dict(zip(cols, _md_row(md, "### ONNX Runtime", "baseline")))
    quant = dict(zip(cols, _md_row(md, "### ONNX Runtime", "quant")))
    assert baseline["mJ/inf x86 b1"] == "12.3"  # 0.0123 J
    assert hybrid["mJ/inf x86 b1"] == "- [1]" and hybrid["mJ/inf x86 b8"] == "- [1]"
    assert f"[1] energy not measured: {NO_METER}" in md
    assert all(quant[c] == "-" for c in cols if "x86" in c)  # never profiled
    assert baseline["p50 ms x86 b8"] == "-"  # profiled at batch 1 only
    energy = {p["batch"]: p for p in _row(rep, "onnxruntime", "hybrid")["profiles"]}
    assert energy[1]["energy_per_inference_j"] is None and energy[1]["energy_reason"] == NO_METER
    pt = dict(zip(_md_columns(md, "### PyTorch"), _md_row(md, "### PyTorch", "baseline")))
    assert pt["Δacc (pt)"] == "-" and pt["low-bit share"] == "-"


def test_pareto_front_on_a_hand_made_set():
    points = [(10.0, 0.80),  # 0: smallest, least accurate: on the front
              (20.0, 0.85),  # 1: front
              (25.0, 0.84),  # 2: beaten by 1 (smaller and more accurate)
              (20.0, 0.85),  # 3: the same as 1: both stay
              (40.0, 0.85),  # 4: as accurate as 1 but bigger: beaten
              (50.0, 0.90),  # 5: most accurate: front
              (60.0, 0.70)]  # 6: beaten by everything
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([(1.0, 0.5)]) == [0]


def test_report_marks_the_front_of_its_points(report):
    rep, _ = report
    (model,) = rep["models"]
    # (bytes, accuracy): ort baseline (1.104 MB, 87.28), ort quant (290 kB, 87.33), ort hybrid (170 kB, 84.14),
    # ov hybrid (282 kB, 82.84): quant beats baseline, hybrid is the smallest, ov hybrid is beaten by ort hybrid
    assert model["pareto"]["bytes"] == ["hybrid/onnxruntime", "quant/onnxruntime"]
    assert model["pareto"]["latency"] == {"x86 b1": ["hybrid/onnxruntime", "baseline/onnxruntime"],
                                          "x86 b8": ["hybrid/onnxruntime"]}


def test_pngs_are_written_valid_and_embedded(report):
    from PIL import Image

    rep, out = report
    pngs = sorted(out.glob("*.png"))
    (model,) = rep["models"]
    expected = {model["plots"]["accuracy_vs_bytes"], model["plots"]["accuracy_vs_latency"],
                model["plots"]["layers"]["hybrid"]}
    assert {p.name for p in pngs} == expected
    md = (out / "report.md").read_text()
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            w, h = im.size
        assert 800 <= w <= 3000 and 400 <= h <= 3000, (p.name, im.size)
        assert f"]({p.name})" in md  # embedded by relative path
    with Image.open(out / model["plots"]["accuracy_vs_latency"]) as im:
        assert im.size[0] > im.size[1] * 2  # two panels side by side: batch 1 and batch 8


def test_html_is_self_contained_with_the_pngs_inlined(report):
    _, out = report
    page = (out / "report.html").read_text()
    inlined = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    pngs = sorted(out.glob("*.png"))
    assert sorted(base64.b64decode(b) for b in inlined) == sorted(p.read_bytes() for p in pngs)
    assert ".png'" not in page and '.png"' not in page  # nothing linked from outside the page
    assert "<table>" in page and "84.14%" in page and NO_METER in page


def test_layer_rows_take_original_channels_from_an_unpruned_plan_or_the_group():
    plans = {}
    for name, pruned in (("hybrid", True), ("quant", False)):
        plan = {"pruning": [], "quantization": {}}
        if pruned:
            plan["pruning"] = [{"name": "layer1.0.conv1", "kind": "channels", "units": 16, "kept": 8,
                                "unit_channels": 1, "sensitivity": 0.024},
                               {"name": "layer2.0.conv2", "kind": "channels", "units": 32, "kept": 24,
                                "unit_channels": 1, "sensitivity": 3.1}]
        c1, c2 = (8, 24) if pruned else (16, 32)
        plan["quantization"] = {"layer1.0.conv1": _layer(c1, {8: c1}), "layer2.1.conv2": _layer(c2, {8: 8, 4: c2 - 8}),
                                "layer2.0.conv2": _layer(c2, {8: c2})}
        plan["layer_sensitivity"] = {"layer1.0.conv1": 0.003, "layer2.1.conv2": 0.0005}
        plans[name] = plan
    alone = {r.name: r for r in layer_rows(plans["hybrid"], None)}
    assert (alone["layer1.0.conv1"].out_channels, alone["layer1.0.conv1"].original) == (8, 16)
    assert alone["layer1.0.conv1"].prune_sensitivity == 0.024 and alone["layer1.0.conv1"].sensitivity == 0.003
    assert alone["layer2.0.conv2"].original == 32
    assert alone["layer2.1.conv2"].original is None  # coupled to a group the plan does not name: unknown
    assert alone["layer2.1.conv2"].bits == {8: 8, 4: 16}
    with_ref = {r.name: r for r in layer_rows(plans["hybrid"], plans["quant"])}
    assert with_ref["layer2.1.conv2"].original == 32


def test_legalization_summary_counts_by_kind():
    s = legalization_summary(LEGAL)
    assert s["count"] == 3 and s["by_kind"] == {"weight bits": 2, "layout": 1}
    assert s["summary"] == "weight bits ×2 → 8-bit; layout ×1"  # a long "after" is left out
    assert legalization_summary([]) == {"count": 0, "by_kind": {}, "summary": ""}


def test_a_parent_dir_is_walked_partials_skipped_and_variants_told_apart(tmp_path):
    root = tmp_path / "tree"
    runs = root / "runs" / "r8"
    write_compressed(runs / "hybrid", "hybrid", 0.8417, 126_298, 19_628_544, 99_912, True, True, 0.5)
    write_export(root / "x" / "split", runs / "hybrid", "onnxruntime", "hybrid", 0.84, 0.8417, 170_000, mixed="split")
    write_export(root / "x" / "layer", runs / "hybrid", "onnxruntime", "hybrid", 0.83, 0.8417, 200_000, mixed="layer")
    write_export(root / "x" / "half.partial", runs / "hybrid", "onnxruntime", "hybrid", 0.1, 0.8417, 1)
    older = json.loads((root / "x" / "layer" / "export.json").read_text())
    del older["options"]["overflow_fix"]  # written before the option existed: it tells nothing apart
    _write(root / "x" / "layer" / "export.json", older)
    rep = run_report([root], tmp_path / "out")
    (model,) = rep["models"]
    rows = model["runtimes"]["onnxruntime"]
    assert sorted((r["variant"], r["bytes_on_disk"]) for r in rows) == [("mixed=layer", 200_000),
                                                                         ("mixed=split", 170_000)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| hybrid | hybrid (mixed=layer) |" in md and "| hybrid | hybrid (mixed=split) |" in md


def test_each_run_is_compared_with_the_export_of_its_own_baseline(tmp_path):
    for series, base_bytes in (("old", 1_000_000), ("new", 2_000_000)):
        runs = tmp_path / series / "r8"
        write_compressed(runs / "baseline", "baseline", 0.87, 269_722, 40_934_144, FP32_BYTES, False, False, None)
        write_compressed(runs / "hybrid", "hybrid", 0.84, 126_298, 19_628_544, 99_912, True, True, 0.5)
        write_export(tmp_path / series / "ort-b", runs / "baseline", "onnxruntime", "baseline", 0.87, 0.87,
                     base_bytes)
        write_export(tmp_path / series / "ort-h", runs / "hybrid", "onnxruntime", "hybrid", 0.84, 0.84, 100_000)
    rep = run_report([tmp_path / "old", tmp_path / "new"], tmp_path / "out")
    rows = {r["run"]: r for r in rep["models"][0]["runtimes"]["onnxruntime"]}
    assert sorted(rows) == ["new/r8/baseline", "new/r8/hybrid", "old/r8/baseline", "old/r8/hybrid"]
    assert rows["old/r8/hybrid"]["compression_vs_baseline_export"] == 10.0
    assert rows["new/r8/hybrid"]["compression_vs_baseline_export"] == 20.0
    assert rows["new/r8/hybrid"]["baseline_export"].endswith("new/ort-b")


def test_a_profile_alone_brings_its_export_and_source_from_disk(results, tmp_path):
    rep = run_report([results / "profiles" / "ort-hybrid-b1"], tmp_path / "out")
    (model,) = rep["models"]
    (row,) = model["runtimes"]["onnxruntime"]
    assert row["run"] == "hybrid" and row["accuracy_pytorch"] == 0.8417 and row["profiles"][0]["p50_ms"] == 0.3125
    assert [r["run"] for r in model["pytorch"]] == ["hybrid"]


def test_a_moved_tree_links_by_trailing_path_components(tmp_path):
    runs = tmp_path / "new" / "runs" / "r8"
    write_compressed(runs / "hybrid", "hybrid", 0.8417, 126_298, 19_628_544, 99_912, True, True, 0.5)
    write_export(tmp_path / "new" / "ort", "/old/machine/runs/r8/hybrid", "onnxruntime", "hybrid", 0.84, 0.83,
                 170_000)
    rep = run_report([tmp_path / "new"], tmp_path / "out")
    (row,) = rep["models"][0]["runtimes"]["onnxruntime"]
    assert row["source_dir"] == str(runs.resolve() / "hybrid") and row["accuracy_pytorch"] == 0.8417
    assert rep["warnings"] == []


def test_an_export_whose_source_is_gone_is_kept_with_dashes_and_a_warning(tmp_path):
    write_export(tmp_path / "in" / "ort", "/gone/runs/r8/hybrid", "onnxruntime", "hybrid", 0.84, 0.83, 170_000)
    rep = run_report([tmp_path / "in"], tmp_path / "out")
    (row,) = rep["models"][0]["runtimes"]["onnxruntime"]
    assert row["accuracy_pytorch"] == 0.83 and row["accuracy_pytorch_from"] == "export.json"
    assert row["params"] is None and row["plan_weight_bytes"] is None
    assert any("/gone/runs/r8/hybrid" in w for w in rep["warnings"])
    md = (tmp_path / "out" / "report.md").read_text()
    cells = dict(zip(_md_columns(md, "### ONNX Runtime"), _md_row(md, "### ONNX Runtime", "hybrid")))
    assert cells["params"] == "-" and cells["plan weight bytes"] == "-" and cells["vs fp32 weights"] == "-"


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_bad_dirs_are_one_line_errors_and_leave_nothing(results, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"does-not-exist does not exist") as exc:
        run_report([results / "runs", tmp_path / "does-not-exist"], out)
    assert "\n" not in str(exc.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("nothing here")
    with pytest.raises(UserError, match=r"empty holds no metrics.json \+ plan.json .*export.json .*profile.json"):
        run_report([tmp_path / "empty"], out)
    with pytest.raises(UserError, match="is a file"):
        run_report([results / "exports" / "ort-hybrid" / "export.json"], out)
    with pytest.raises(UserError, match="at least one directory"):
        run_report([], out)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "export.json").write_text("{not json")
    with pytest.raises(UserError, match=r"corrupt/export.json is not valid JSON"):
        run_report([bad], out)
    _nothing_written(tmp_path, out)


def test_an_existing_output_is_refused_and_left_alone(results, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="exists"):
        run_report([results / "runs"], out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not (tmp_path / "out.partial").exists()


def test_a_failure_while_writing_leaves_no_partial_output(results, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full (test)")

    monkeypatch.setattr(plots, "plot_layers", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        run_report([results / "runs"], out)
    _nothing_written(tmp_path, out)
    monkeypatch.undo()
    (tmp_path / "out.partial").mkdir()  # what a killed run leaves: the next run starts afresh
    (tmp_path / "out.partial" / "stale.png").write_bytes(b"stale")
    run_report([results / "runs"], out)
    assert (out / "report.md").is_file() and not (out / "stale.png").exists()
    assert not (tmp_path / "out.partial").exists()


GOLDEN = TESTS / "data" / "report" / "golden.md"


def _structure(md: str) -> list[tuple]:
    """What a reader sees, without the prose: headings, every table cell by cell, the embedded pictures."""
    items: list[tuple] = []
    table: list[list[str]] = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):  # skip the alignment row
                table.append([c.strip() for c in line.strip().strip("|").split(" | ")])
            continue
        if table:
            items.append(("table", table))
            table = []
        if line.startswith("#"):
            items.append(("heading", line))
        elif line.startswith("!["):
            items.append(("picture", line))
    return items


def test_markdown_matches_the_golden_file_structurally(report):
    """tests/data/report/golden.md was rendered from these recorded results and checked by eye; a change to any
    heading, table cell, row order or picture shows up here (regenerate it only for an intended change)."""
    _, out = report
    got, want = _structure((out / "report.md").read_text()), _structure(GOLDEN.read_text())
    assert [kind for kind, _ in got] == [kind for kind, _ in want]
    for (kind, g), (_, w) in zip(got, want):
        if kind == "table":
            assert g[0] == w[0], "columns changed"
            assert len(g) == len(w), f"rows changed under {w[0][:3]}"
            for grow, wrow in zip(g, w):
                assert grow == wrow
        else:
            assert g == w
