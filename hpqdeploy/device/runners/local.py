"""Runners in this process: the export runtimes' own sessions (ONNX Runtime, OpenVINO, ExecuTorch's Python
runtime, TensorRT's Python API), timed call by call with `time.perf_counter`."""

from __future__ import annotations

import time
from pathlib import Path

from hpqdeploy.device.runners.base import Runner, RunnerUnavailable, RunSettings, Timing, register_runner
from hpqdeploy.lower.base import get_runtime


def _status(field: str) -> int | None:
    """A `/proc/self/status` size field (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS, so the peak covers load + run only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class LocalRunner(Runner):
    runtime: str

    def prepare(self, artifact_dir: Path, inputs, settings: RunSettings) -> None:
        rt = get_runtime(self.runtime)
        missing = rt.missing()
        if missing:
            raise RunnerUnavailable(f"{missing} is not installed (pip install 'hpqdeploy[{rt.extra}]')")
        self.check(artifact_dir)
        self.inputs = inputs
        self.rss_before = _status("VmRSS")
        self.peak_reset = _reset_peak_rss()
        self.session = rt.load(Path(artifact_dir), threads=settings.threads)

    def check(self, artifact_dir: Path) -> None:
        """Refuse artifacts this runner would not really execute (see the TensorRT runner)."""

    def run(self, settings: RunSettings) -> Timing:
        warm, w0 = 0, time.monotonic()
        while warm < settings.warmup or time.monotonic() - w0 < settings.warmup_seconds:
            self.session(self.inputs)
            warm += 1
        note = f"warm-up: {warm} untimed calls in {time.monotonic() - w0:.2f} s"
        times = []
        t0 = time.monotonic()
        while len(times) < settings.iters or time.monotonic() - t0 < settings.min_seconds:
            start = time.perf_counter()
            self.session(self.inputs)
            times.append((time.perf_counter() - start) * 1e3)
        return Timing(times, t0, time.monotonic(), settings.batch, notes=[note])

    def memory(self) -> dict:
        peak = _status("VmHWM")
        if peak is None:
            return {"peak_rss_bytes": None, "reason": "no /proc/self/status"}
        return {"peak_rss_bytes": peak, "rss_before_load_bytes": self.rss_before,
                "peak_covers": "load + warm-up + timed run" if self.peak_reset else
                "the whole process (peak could not be reset)",
                "note": "resident set of the whole Python process, interpreter and imported libraries included"}

    def info(self) -> dict:
        import importlib.metadata as md

        versions = {}
        for package in get_runtime(self.runtime).modules:
            try:
                versions[package] = md.version(package)
            except md.PackageNotFoundError:
                continue
        return {**self.session.info(), "package_versions": versions}


@register_runner("onnxruntime")
class OnnxRuntimeRunner(LocalRunner):
    runtime = "onnxruntime"


@register_runner("openvino")
class OpenVINORunner(LocalRunner):
    runtime = "openvino"


@register_runner("executorch")
class ExecuTorchRunner(LocalRunner):
    runtime = "executorch"


@register_runner("tensorrt")
class TensorRTRunner(LocalRunner):
    """A serialized engine through TensorRT's Python API; never the ONNX fallback `export` uses for accuracy."""

    runtime = "tensorrt"

    def check(self, artifact_dir: Path) -> None:
        from hpqdeploy.lower.tensorrt_rt import ENGINE_FILE, engine_unavailable

        reason = engine_unavailable()
        if reason:
            raise RunnerUnavailable(f"TensorRT runner: {reason}")
        if not (Path(artifact_dir) / ENGINE_FILE).is_file():
            raise RunnerUnavailable(f"TensorRT runner: {artifact_dir} has no {ENGINE_FILE}; build it on the device "
                                    "(the export wrote the command)")
