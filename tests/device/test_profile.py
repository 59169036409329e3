"""The profile engine: timing, energy over exactly the timed window, idle power beside it, honest nulls."""

from __future__ import annotations

import json
import re
import time

import pytest

pytest.importorskip("onnxruntime")

from hpqdeploy.config import ExportOptions, ProfileOptions  # noqa: E402
from hpqdeploy.device import profiles as device_profiles  # noqa: E402
from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading, register_meter  # noqa: E402
from hpqdeploy.device.profile import latency_stats, run_profile, spread  # noqa: E402
from hpqdeploy.errors import UserError  # noqa: E402
from hpqdeploy.lower.export import run_export  # noqa: E402


WATTS = 5.0


@register_meter("test-constant-power")
class ConstantPower(PowerMeter):
    """5 W at every reading; `fail_after` readings later it behaves like an unplugged device."""

    kind = "power"

    def open(self) -> None:
        if self.config.get("absent"):
            raise MeterUnavailable("power: no meter found (test)")
        self.reads = 0

    def read(self) -> Reading:
        self.reads += 1
        if self.config.get("fail_after") and self.reads > self.config["fail_after"]:
            raise MeterUnavailable("device vanished (test)")
        return Reading(time.monotonic(), watts=WATTS, parts={"rail": WATTS})


@pytest.fixture(scope="module")
def ort_export(digits_hybrid, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "ort"
    run_export(digits_hybrid / "hybrid", out, ExportOptions("onnxruntime", batch_size=16), quiet=True)
    return out


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    """A profiles/ directory of test device kinds, each with the test meter configured differently."""
    root = tmp_path / "profiles"
    root.mkdir()
    kinds = {"metered": "interval_ms = 10", "absent": "absent = true",
             "vanishing": "interval_ms = 10\nfail_after = 3", "nometer": None}
    for kind, meter in kinds.items():
        text = f'name = "{kind}"\ntransport = "local"\nrunners = ["onnxruntime"]\n'
        if meter:
            text += f'[meter]\nname = "test-constant-power"\n{meter}\n'
        (root / f"{kind}.toml").write_text(text)
    monkeypatch.setattr(device_profiles, "PROFILES_DIR", root)
    return root


def _opts(device: str, **kw) -> ProfileOptions:
    return ProfileOptions(device=device, **{"warmup": 2, "warmup_seconds": 0.0, "iters": 20, "repeats": 2,
                                            "idle_seconds": 0.1, **kw})


def test_warmup_runs_its_calls_and_its_seconds(ort_export, profiles, tmp_path):
    def warmup_note(result: dict) -> tuple[int, float]:
        (note,) = [n for n in result["repeats"][0]["notes"] if n.startswith("warm-up:")]
        calls, seconds = re.fullmatch(r"warm-up: (\d+) untimed calls in ([\d.]+) s", note).groups()
        return int(calls), float(seconds)

    assert warmup_note(run_profile(ort_export, tmp_path / "a", _opts("nometer", warmup=3, repeats=1)))[0] == 3
    by_time = run_profile(ort_export, tmp_path / "b", _opts("nometer", warmup=1, warmup_seconds=0.2, repeats=1))
    calls, seconds = warmup_note(by_time)
    assert calls > 1 and seconds >= 0.2 and by_time["settings"]["warmup_seconds"] == 0.2


def test_energy_is_integrated_over_the_timed_window(ort_export, profiles, tmp_path):
    result = run_profile(ort_export, tmp_path / "p", _opts("metered", min_seconds=0.2, batch_size=4))
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["artifact_sha256"] == result["artifact_sha256"]
    assert len(result["repeats"]) == 2
    for r in result["repeats"]:
        assert r["calls"] >= 20 and len(r["times_ms"]) == r["calls"]
        e = r["energy"]
        assert e["samples"] >= 10  # sampled at 10 ms over >= 0.2 s
        assert e["energy_j"] == pytest.approx(WATTS * e["seconds"], rel=1e-4)  # both rounded to 1e-6
        assert e["energy_per_inference_j"] == pytest.approx(e["energy_j"] / (4 * r["calls"]))
        assert e["seconds"] >= 0.2
    energy = result["energy"]
    assert energy["idle"]["mean_power_w"] == pytest.approx(WATTS)  # reported beside, not subtracted
    assert energy["energy_per_inference_j"] > 0 and energy["reason"] is None
    lat = result["latency"]
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["calls"] == sum(r["calls"] for r in result["repeats"])
    assert result["settings"]["batch"] == 4 and result["runner"]["name"] == "onnxruntime"
    assert result["runner"]["package_versions"]["onnxruntime"]
    assert result["memory"]["peak_rss_bytes"] > 0


@pytest.mark.parametrize("device, reason", [("absent", "no meter found"), ("nometer", "names no power meter"),
                                            ("vanishing", "device vanished")])
def test_no_meter_means_null_energy_with_the_reason_and_latency_still_measured(ort_export, profiles, tmp_path,
                                                                              device, reason):
    result = run_profile(ort_export, tmp_path / "p", _opts(device, idle_seconds=0.05))
    energy = result["energy"]
    assert energy["energy_per_inference_j"] is None and energy["energy_per_inference_j_per_repeat"] is None
    assert reason in energy["reason"]
    assert all(r["energy"]["energy_per_inference_j"] is None for r in result["repeats"])
    assert result["latency"]["p50_ms"] > 0


def test_this_machine_reports_no_power_number(ort_export, tmp_path):
    """The real x86 profile here: RAPL is absent (or root-only), so energy is null with a reason."""
    result = run_profile(ort_export, tmp_path / "p", _opts("x86", idle_seconds=0.05))
    if result["energy"]["energy_per_inference_j"] is not None:
        pytest.skip("this machine exposes a readable RAPL meter")
    assert result["energy"]["reason"]
    assert result["state"]["before"]["files"].keys() >= {"governor"}


def test_bad_inputs_are_refused(ort_export, digits_hybrid, profiles, tmp_path):
    with pytest.raises(UserError, match="not a `hpqdeploy export` output"):
        run_profile(digits_hybrid / "hybrid", tmp_path / "a", _opts("metered"))
    with pytest.raises(UserError, match="device must be one of"):
        run_profile(ort_export, tmp_path / "b", _opts("toaster"))
    with pytest.raises(UserError, match="runs openvino artifacts"):
        run_profile(ort_export, tmp_path / "c", _opts("metered", runner="openvino"))
    with pytest.raises(UserError, match="must be >= 1"):
        run_profile(ort_export, tmp_path / "d", _opts("metered", batch_size=0))
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="exists"):
        run_profile(ort_export, tmp_path / "e", _opts("metered"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "profiles"]  # nothing half-written


def test_tensorrt_runner_refuses_without_gpu_and_engine(ort_export, profiles, tmp_path):
    pytest.importorskip("onnx")
    from hpqdeploy.lower.tensorrt_rt import engine_unavailable

    if engine_unavailable() is None:
        pytest.skip("TensorRT and a GPU are here")
    (profiles / "gpu.toml").write_text('name = "gpu"\nrunners = ["tensorrt"]\n')
    meta = json.loads((ort_export / "export.json").read_text())  # the refusal comes before the files are read
    fake = tmp_path / "fake-trt"
    fake.mkdir()
    (fake / "export.json").write_text(json.dumps({**meta, "runtime": "tensorrt"}))
    with pytest.raises(UserError, match="TensorRT runner: .*(no CUDA GPU|not installed)"):
        run_profile(fake, tmp_path / "p", _opts("gpu"))


def test_latency_stats_and_spread():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0], batch=8)
    assert stats["p50_ms"] == 2.5 and stats["min_ms"] == 1.0 and stats["max_ms"] == 4.0
    assert stats["throughput_per_s"] == pytest.approx(8 * 4 / 0.010)
    assert spread([10.0, 10.5, 11.0]) == pytest.approx(0.1 / 1.05)


@register_meter("test-other-power")
class OtherPower(ConstantPower):
    def read(self) -> Reading:
        return Reading(time.monotonic(), watts=2 * WATTS)


def test_meter_alternative_and_runner_fallback(ort_export, profiles, tmp_path, monkeypatch):
    """--meter picks [meter_alternatives.NAME]; a runner that cannot run here hands over to the next one."""
    from hpqdeploy.device.runners.local import OnnxRuntimeRunner

    (profiles / "two.toml").write_text('name = "two"\nrunners = ["broken-ort", "onnxruntime"]\n'
                                       '[meter]\nname = "test-constant-power"\ninterval_ms = 10\n'
                                       '[meter_alternatives.other]\nname = "test-other-power"\ninterval_ms = 10\n')

    from hpqdeploy.device.runners.base import RunnerUnavailable, register_runner

    @register_runner("broken-ort")
    class Broken(OnnxRuntimeRunner):
        def prepare(self, *a):
            raise RunnerUnavailable("no accelerator here (test)")

    result = run_profile(ort_export, tmp_path / "p", _opts("two", meter="other", idle_seconds=0.05))
    assert result["energy"]["idle"]["mean_power_w"] == pytest.approx(2 * WATTS)
    assert result["runner"]["name"] == "onnxruntime"
    assert result["runner"]["skipped"] == [{"runner": "broken-ort", "reason": "no accelerator here (test)"}]
    with pytest.raises(UserError, match="no accelerator here"):
        run_profile(ort_export, tmp_path / "q", _opts("two", runner="broken-ort"))
