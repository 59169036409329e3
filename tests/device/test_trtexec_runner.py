"""The trtexec runner against a fake trtexec per TensorRT version: flags, engine build, exported times, window."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TESTS, install_fake_executable

from hpqdeploy.device.runners import trtexec
from hpqdeploy.device.runners.base import RunnerUnavailable, RunSettings, get_runner
from hpqdeploy.device.runners.trtexec import TrtVersion, build_command, parse_export_times, parse_version, run_command
from hpqdeploy.errors import UserError
from hpqdeploy.lower.tensorrt_rt import ENGINE_FILE, MODEL_FILE, write_build_script

DATA = TESTS / "data" / "jetson"
TRT85, TRT86, TRT10, TRT11 = "8502", "8602", "100300", "110000"
TIMES = {TRT85: "trtexec_times_trt85.json", TRT86: "trtexec_times_trt85.json", TRT10: "trtexec_times_trt10.json",
         TRT11: "trtexec_times_trt10.json"}


class Fake:
    """A fake `trtexec` on PATH; `calls()` are the argument lists it was run with."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.monkeypatch, self.args = monkeypatch, tmp_path / "trtexec-args.jsonl"
        bindir = tmp_path / "bin"
        install_fake_executable(bindir, "trtexec", DATA / "fake_trtexec.py")
        monkeypatch.setenv("PATH", str(bindir))
        monkeypatch.setattr(trtexec, "JETPACK_DIRS", ())
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the runner's work directories land here
        monkeypatch.setenv("FAKE_TRTEXEC_ARGS", str(self.args))
        for var in ("FAKE_TRTEXEC_FAIL", "FAKE_TRTEXEC_QUIET"):
            monkeypatch.delenv(var, raising=False)
        self.version(TRT10)

    def version(self, packed: str) -> "Fake":
        self.monkeypatch.setenv("FAKE_TRTEXEC_VERSION", packed)
        self.monkeypatch.setenv("FAKE_TRTEXEC_TIMES", str(DATA / TIMES[packed]))
        return self

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.args.read_text().splitlines()] if self.args.exists() else []

    def runs(self) -> list[list[str]]:
        return [c for c in self.calls() if any(a.startswith("--loadEngine=") for a in c)]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Fake:
    return Fake(tmp_path, monkeypatch)


def engine_dir(tmp_path: Path) -> Path:
    art = tmp_path / "artifact"
    art.mkdir()
    (art / ENGINE_FILE).write_bytes(b"engine")
    return art


def tiny_onnx(path: Path, name: str = "images", elem=None) -> None:
    from onnx import TensorProto, helper, save

    elem = elem or TensorProto.FLOAT
    x = helper.make_tensor_value_info(name, elem, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", elem, ["N", 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Identity", [name], ["logits"])], "g", [x], [y])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def records(packed: str) -> list[dict]:
    return json.loads((DATA / TIMES[packed]).read_text())


def flag(cmd: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")), None)


# ---------------------------------------------------------------------------------------------------------------
# version and commands


@pytest.mark.parametrize("text, version", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --help", TrtVersion(8, 5, 2)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8602] # trtexec", TrtVersion(8, 6, 2)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help", TrtVersion(10, 3, 0)),
    ("&&&& PASSED TensorRT.trtexec [TensorRT v101300] [b43] # trtexec", TrtVersion(10, 13, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110000] # trtexec", TrtVersion(11, 0, 0)),
    ("[10/02/2026-07:32:12] [I] TensorRT version: 10.3.0", TrtVersion(10, 3, 0)),
    ("trtexec: command not found", None),
])
def test_parse_version(text, version):
    assert parse_version(text) == version


@pytest.mark.parametrize("packed, version", [(TRT85, "8.5.2"), (TRT10, "10.3.0"), (TRT11, "11.0.0")])
def test_version_from_the_help_banner(fake, packed, version):
    fake.version(packed)
    assert str(trtexec.detect_version("trtexec")) == version
    assert fake.calls() == [["--help"]]


SHAPES = {"input_ids": ((1, 12), (1, 12), (32, 12)), "attention_mask": ((1, 12), (1, 12), (32, 12))}


def test_build_flags_per_version():
    def build(v, **kw):
        return build_command("trtexec", v, Path("m.onnx"), Path("m.plan"), SHAPES, **kw)

    v82, v85, v86, v10, v11 = (TrtVersion(8, 2, 1), TrtVersion(8, 5, 2), TrtVersion(8, 6, 2), TrtVersion(10, 3, 0),
                               TrtVersion(11, 0, 0))
    assert build(v10, workspace_mib=1024) == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--stronglyTyped",
        "--minShapes=input_ids:1x12,attention_mask:1x12", "--optShapes=input_ids:1x12,attention_mask:1x12",
        "--maxShapes=input_ids:32x12,attention_mask:32x12", "--memPoolSize=workspace:1024"]
    for v in (v85, v86):  # weakly typed: Q/DQ honoured only with --int8; no --stronglyTyped in 8.x
        cmd = build(v, workspace_mib=512)
        assert "--int8" in cmd and "--stronglyTyped" not in cmd and "--memPoolSize=workspace:512" in cmd
    assert "--workspace=512" in build(v82, workspace_mib=512)  # before 8.4
    assert "--fp16" in build(v85, fp16=True)
    cmd11 = build(v11)
    assert not {"--stronglyTyped", "--int8", "--fp16"} & set(cmd11)  # 11: always strongly typed, flags removed
    for v in (v82, v85, v10, v11):
        assert not any(a.startswith(("--explicitBatch", "--calib")) for a in build(v))
    with pytest.raises(ValueError, match="weak-typing"):
        build(v10, fp16=True)


def test_run_command():
    cmd = run_command("trtexec", TrtVersion(10, 3, 0), Path("a/model.plan"), Path("t.json"), 120, 2.5,
                      {"images": (8, 3, 16, 16)}, {"images": Path("in0.bin")})
    assert cmd == ["trtexec", "--loadEngine=a/model.plan", "--warmUp=0", "--iterations=120", "--duration=3",
                   "--exportTimes=t.json", "--shapes=images:8x3x16x16", "--loadInputs=images:in0.bin"]


def test_export_times_errors(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("[ { \"latencyMs\" : 1.0 }, ")
    with pytest.raises(RunnerUnavailable, match="not JSON"):
        parse_export_times(bad)
    bad.write_text("[]")
    with pytest.raises(RunnerUnavailable, match="no per-iteration latencyMs"):
        parse_export_times(bad)
    with pytest.raises(RunnerUnavailable, match="no timing file"):
        parse_export_times(tmp_path / "missing.json")


def test_recorded_formats():
    old, new = records(TRT85), records(TRT10)
    assert "endToEndMs" in old[0] and "endToEndMs" not in new[0]  # 10.x dropped it
    for r in old + new:
        assert r["latencyMs"] == pytest.approx(r["h2dMs"] + r["computeMs"] + r["d2hMs"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the runner


def test_registered_for_tensorrt_artifacts():
    runner = get_runner("trtexec")
    assert runner.runtime == "tensorrt"


@pytest.mark.parametrize("packed", [TRT85, TRT10, TRT11])
def test_run_times_drop_warmup_and_window_holds_timed_part(fake, tmp_path, packed):
    fake.version(packed)
    runner = get_runner("trtexec")
    batch = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    settings = RunSettings(batch=2, warmup=5, iters=20)
    runner.prepare(engine_dir(tmp_path), {"images": batch}, settings)
    timing = runner.run(settings)
    recs = records(packed)[:25]
    assert timing.times_ms == pytest.approx([r["latencyMs"] for r in recs[5:]], rel=1e-5)
    assert timing.inferences == 40
    (cmd,) = fake.runs()
    assert flag(cmd, "--iterations") == "25" and flag(cmd, "--warmUp") == "0" and flag(cmd, "--duration") == "0"
    assert flag(cmd, "--shapes") == "images:2x3x16x16"
    name, _, path = flag(cmd, "--loadInputs").rpartition(":")
    assert name == "images" and np.array_equal(np.fromfile(path, np.float32).reshape(batch.shape), batch)
    run = runner.last
    start = min(recs[5]["startEnqMs"], recs[5]["startH2dMs"]) / 1000
    span = max(r["endD2hMs"] for r in recs[5:]) / 1000 - start
    assert run.t_spawn < run.t_infer <= timing.t0 < timing.t1 <= run.t_end
    assert timing.t0 == pytest.approx(run.t_infer + start)
    assert timing.t1 - timing.t0 == pytest.approx(span)
    assert timing.window_covers.startswith("timed iterations only")
    assert any("TensorRT " + str(runner.version) in n for n in timing.notes)
    assert runner.memory()["peak_rss_bytes"] > 0
    assert runner.info()["version"] == str(parse_version(f"[TensorRT v{packed}]"))
    runner.close()
    assert not Path(path).exists()  # work directory removed


def test_warmup_seconds_drops_the_records_inside_it_and_the_next_run_asks_for_enough(fake, tmp_path):
    recs = records(TRT10)
    settings = RunSettings(batch=1, warmup=2, iters=20, warmup_seconds=0.0015)
    inside = sum(1 for r in recs if r["startEnqMs"] < 1.5)
    assert inside > settings.warmup
    runner = get_runner("trtexec")
    runner.prepare(engine_dir(tmp_path), {"images": np.zeros((1, 3, 16, 16), np.float32)}, settings)
    first = runner.run(settings)  # no time per iteration known yet: 2 + 20 iterations, `inside` of them warm-up
    assert first.times_ms == pytest.approx([r["latencyMs"] for r in recs[inside:22]], rel=1e-5)
    assert any(f"{22 - inside} timed iterations, not 20" in n for n in first.notes)
    period = (recs[21]["startEnqMs"] - recs[0]["startEnqMs"]) / 21
    second = runner.run(settings)  # now the warm-up count covers 1.5 ms at the period seen
    want = max(2, -(-1.5 // period)) + 20
    runs = fake.runs()
    assert [flag(c, "--iterations") for c in runs] == ["22", str(int(want))]
    assert [flag(c, "--duration") for c in runs] == ["1", "1"]  # --duration grows by warmup_seconds (whole s in 8.x)
    assert len(second.times_ms) == min(len(recs), want) - inside >= 20
    assert not any("timed iterations, not" in n for n in second.notes)
    runner.close()


def test_runs_line_buffered_where_stdbuf_exists(fake, tmp_path, monkeypatch):
    import os
    import shutil

    stdbuf = shutil.which("stdbuf", path="/usr/bin:/bin")
    if stdbuf is None:
        pytest.skip("no stdbuf here")
    monkeypatch.setenv("PATH", os.environ["PATH"] + os.pathsep + str(Path(stdbuf).parent))
    runner = get_runner("trtexec")
    settings = RunSettings(warmup=1, iters=5)
    runner.prepare(engine_dir(tmp_path), {"images": np.zeros((1, 3, 16, 16), np.float32)}, settings)
    timing = runner.run(settings)
    assert timing.window_covers.startswith("timed iterations only") and len(timing.times_ms) == 5
    assert runner.last.command[0] == "trtexec" or runner.last.command[0].endswith("/trtexec")
    runner.close()


def test_window_falls_back_to_the_process_without_the_log_line(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_QUIET", "1")
    runner = get_runner("trtexec")
    settings = RunSettings(warmup=2, iters=8)
    runner.prepare(engine_dir(tmp_path), {"images": np.zeros((1, 3, 16, 16), np.float32)}, settings)
    timing = runner.run(settings)
    assert (timing.t0, timing.t1) == (runner.last.t_spawn, runner.last.t_end)
    assert "whole trtexec process" in timing.window_covers
    runner.close()


@pytest.mark.parametrize("packed, itemsize", [(TRT85, 4), (TRT10, 8)])
def test_int64_inputs_are_int32_before_tensorrt_10(fake, tmp_path, packed, itemsize):
    fake.version(packed)
    runner = get_runner("trtexec")
    ids = np.arange(24, dtype=np.int64).reshape(2, 12)
    settings = RunSettings(batch=2, warmup=1, iters=4)
    runner.prepare(engine_dir(tmp_path), {"input_ids": ids, "attention_mask": np.ones_like(ids)}, settings)
    runner.run(settings)
    (cmd,) = fake.runs()
    assert flag(cmd, "--shapes") == "input_ids:2x12,attention_mask:2x12"
    files = dict(spec.rsplit(":", 1) for spec in flag(cmd, "--loadInputs").split(","))
    assert Path(files["input_ids"]).stat().st_size == 24 * itemsize
    assert np.array_equal(np.fromfile(files["input_ids"], f"int{8 * itemsize}"), ids.ravel())
    runner.close()


def test_single_array_input_is_named_from_the_onnx_model(fake, tmp_path):
    art = engine_dir(tmp_path)
    tiny_onnx(art / MODEL_FILE, name="pixels")
    runner = get_runner("trtexec")
    settings = RunSettings(warmup=1, iters=3)
    runner.prepare(art, np.zeros((1, 3, 16, 16), np.float64), settings)  # float64 given, float32 engine input
    runner.run(settings)
    (cmd,) = fake.runs()
    name, _, path = flag(cmd, "--loadInputs").rpartition(":")
    assert name == "pixels" and Path(path).stat().st_size == 3 * 16 * 16 * 4
    runner.close()


@pytest.mark.parametrize("packed, expected, absent", [
    (TRT85, {"--int8"}, {"--stronglyTyped"}),
    (TRT10, {"--stronglyTyped"}, {"--int8"}),
    (TRT11, set(), {"--int8", "--stronglyTyped"}),
])
def test_engine_built_with_this_versions_flags(fake, tmp_path, packed, expected, absent):
    fake.version(packed)
    art = tmp_path / "artifact"
    art.mkdir()
    tiny_onnx(art / MODEL_FILE)
    write_build_script(art, {"images": ((1, 3, 16, 16), (1, 3, 16, 16), (32, 3, 16, 16))}, int4=False)
    runner = get_runner("trtexec")
    settings = RunSettings(warmup=1, iters=3)
    runner.prepare(art, np.zeros((1, 3, 16, 16), np.float32), settings)
    assert (art / ENGINE_FILE).is_file()
    build = next(c for c in fake.calls() if any(a.startswith("--onnx=") for a in c))
    assert expected <= set(build) and not absent & set(build)
    assert flag(build, "--maxShapes") == "images:32x3x16x16" and flag(build, "--minShapes") == "images:1x3x16x16"
    timing = runner.run(settings)
    assert any("engine built here" in n for n in timing.notes)
    runner.close()


def test_no_trtexec(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(trtexec, "JETPACK_DIRS", ())
    with pytest.raises(RunnerUnavailable, match="no trtexec on PATH"):
        get_runner("trtexec").prepare(engine_dir(tmp_path), np.zeros((1, 3)), RunSettings())


def test_no_engine_and_no_model(fake, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunnerUnavailable, match=f"neither {ENGINE_FILE} nor {MODEL_FILE}"):
        get_runner("trtexec").prepare(tmp_path / "empty", np.zeros((1, 3)), RunSettings())


def test_no_engine_and_building_disabled(fake, tmp_path):
    art = tmp_path / "artifact"
    art.mkdir()
    tiny_onnx(art / MODEL_FILE)
    runner = get_runner("trtexec", {"trtexec": {"build_engine": False}})
    with pytest.raises(RunnerUnavailable, match="build_engine.sh"):
        runner.prepare(art, np.zeros((1, 3, 16, 16), np.float32), RunSettings())


def test_failed_run_is_one_line(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "run")
    runner = get_runner("trtexec")
    runner.prepare(engine_dir(tmp_path), {"images": np.zeros((1, 3, 16, 16), np.float32)}, RunSettings())
    with pytest.raises(RunnerUnavailable) as err:
        runner.run(RunSettings())
    message = str(err.value)
    assert "exit 1" in message and "out of memory" in message and "\n" not in message
    log = Path(message.rsplit("log: ", 1)[1])
    runner.close()
    assert log.is_file()  # kept after a failure


def test_failed_build(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "build")
    art = tmp_path / "artifact"
    art.mkdir()
    tiny_onnx(art / MODEL_FILE)
    runner = get_runner("trtexec")
    with pytest.raises(RunnerUnavailable, match=r"could not build model\.plan .*exit 1.*optimization profile") as err:
        runner.prepare(art, np.zeros((1, 3, 16, 16), np.float32), RunSettings())
    runner.close()
    assert Path(str(err.value).rsplit("log: ", 1)[1]).is_file()  # the build log outlives close() after a failure


def test_unknown_profile_setting():
    with pytest.raises(UserError, match=r"\[trtexec\]: unknown setting\(s\) warmup_ms"):
        get_runner("trtexec", {"trtexec": {"warmup_ms": 200}})
