"""`android-executorch`: an exported `.pte` run on an Android device by ExecuTorch's own `executor_runner`, over adb.

The user builds `executor_runner` for Android arm64 (ExecuTorch's CMake with the Android NDK toolchain,
`-DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_ENABLE_LOGGING=ON`: Release builds default to no logging, and the
runner's timings are log lines). The profile's [adb] table says where it is: already on the device
(`executor_runner`) or on the host (`executor_runner_host`, pushed to the work directory).

What the runner reports, from `examples/portable/executor_runner/executor_runner.cpp`:
- flags `--model_path`, `--num_executions` (default 1), and in newer versions `--cpu_threads` (threadpool size;
  -1 = its performant-core heuristic), `--inputs` (comma-separated raw input files), `--print_output`;
- `Iteration i of N: X ms` per execution (newer versions) and `Model executed successfully N time(s) in X ms.`
  (the sum of `Method::execute()` times) at the end, `Model loaded in X ms.`, `Resetting threadpool with num
  threads = T`; all through ET_LOG, i.e. stderr with the posix PAL, logcat (tag ExecuTorch) with the Android PAL.

So: when the runner prints per-iteration lines, one process runs warm-up + timed executions and the warm-up ones
are dropped. When it prints only the total, each timed call is a process of its own running one execution (all
in one device-side loop), so every time is real but is a first execution after loading; a separate warm-up
invocation runs before them. Nothing is averaged into per-call numbers. The host window is the one `adb shell`
call around the timed executions and `Timing.window_covers` says what else it holds. Peak RSS comes from
`toybox time -v` around the runner (ru_maxrss of the process).
"""

from __future__ import annotations

import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpqdeploy.device.adb import Adb, AdbError, DeviceGone, connect
from hpqdeploy.device.runners.base import (Runner, RunnerUnavailable, RunSettings, Timing, calls_covering,
                                           register_runner)

PROGRAM = "model_b{}.pte"
TEXT_INPUTS = ("input_ids", "attention_mask")  # the order of the exported programs' arguments
DEFAULTS = {
    "work_dir": "/data/local/tmp/hpqdeploy",
    "executor_runner": "/data/local/tmp/executor_runner",
    "executor_runner_host": "",
    "time_command": ["toybox", "time", "-v"],
    "log_source": "auto",
    "run_timeout_s": 900,
    "dumpsys_unplug": False,
    "cleanup": False,
}
LOG_TAG = "hpqdeploy"
BUILD_HINT = ("rebuild executor_runner with -DEXECUTORCH_ENABLE_LOGGING=ON (Release builds default to OFF) and "
              "EXECUTORCH_LOG_LEVEL=Info")

_ITERATION = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")
_TOTAL = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")
_LOADED = re.compile(r"Model loaded in ([0-9.]+) ms")
_THREADS = re.compile(r"Resetting threadpool with num threads = (-?\d+)")
_MAX_RSS = re.compile(r"(?:Max RSS \(KiB\)|Maximum resident set size \(kbytes\)):\s*(\d+)")
_FLAG = re.compile(r"^\s+-(\w+) \(", re.M)


@dataclass
class RunnerOutput:
    """What one executor_runner invocation (or a loop of them) printed."""

    iterations: list[float] = field(default_factory=list)  # ms per `Iteration i of N` line, in order
    totals: list[tuple[int, float]] = field(default_factory=list)  # (executions, ms) per process
    load_ms: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    max_rss_kib: list[int] = field(default_factory=list)

    @property
    def has_timings(self) -> bool:
        return bool(self.iterations or self.totals)


def parse_runner_output(text: str) -> RunnerOutput:
    out = RunnerOutput()
    out.iterations = [float(m.group(3)) for m in _ITERATION.finditer(text)]
    out.totals = [(int(m.group(1)), float(m.group(2))) for m in _TOTAL.finditer(text)]
    out.load_ms = [float(m.group(1)) for m in _LOADED.finditer(text)]
    out.threads = [int(m.group(1)) for m in _THREADS.finditer(text)]
    out.max_rss_kib = [int(m.group(1)) for m in _MAX_RSS.finditer(text)]
    return out


def parse_flags(help_text: str) -> set[str]:
    """Flag names from gflags' `--help` listing (`    -num_executions (Number of times ...) type: uint32`)."""
    return set(_FLAG.findall(help_text))


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("E ", "F ")) or "rror" in line or "failed" in line]
    return ((errors or lines or ["no output"])[-1])[:240]


@register_runner("android-executorch")
class AndroidExecuTorchRunner(Runner):
    runtime = "executorch"

    def __init__(self, profile_extra: dict | None = None):
        super().__init__(profile_extra)
        self.cfg = {**DEFAULTS, **dict(self.profile_extra.get("adb", {}))}
        self.adb: Adb | None = None
        self.flags: set[str] = set()
        self.notes: list[str] = []
        self.mode: str | None = None  # "per_iteration" | "total_only", learnt from the first invocation
        self.log_source: str | None = None if self.cfg["log_source"] == "auto" else self.cfg["log_source"]
        self.estimate_ms: float | None = None  # one execution, from the last run
        self.peak_rss_kib: int | None = None
        self.time_command: list[str] = []
        self.memory_reason = ""
        self.pushed: list[str] = []
        self.unplugged = False
        self.device_info: dict = {}
        self.reported_threads: int | None = None
        self.load_ms: float | None = None

    # -- prepare -----------------------------------------------------------------------------------------------------

    def prepare(self, artifact_dir: Path, inputs, settings: RunSettings) -> None:
        if self.cfg["log_source"] not in ("auto", "stdio", "logcat"):
            raise RunnerUnavailable(f"android-executorch: log_source must be auto, stdio or logcat, not "
                                    f"{self.cfg['log_source']!r} ([adb] table)")
        self.notes, self.pushed = [], []
        program = Path(artifact_dir) / PROGRAM.format(settings.batch)
        if not program.is_file():
            have = sorted(p.name for p in Path(artifact_dir).glob(PROGRAM.format("*")))
            raise RunnerUnavailable(f"android-executorch: {artifact_dir} has no {program.name} for batch "
                                    f"{settings.batch} (it has: {', '.join(have) or 'no ExecuTorch program'}); "
                                    f"export with --batch-size {settings.batch}")
        try:
            self.adb = connect(self.profile_extra, self.profile_extra.get("serial"))
            self._prepare_device(program, inputs, settings)
        except DeviceGone:
            raise
        except AdbError as exc:
            raise RunnerUnavailable(f"android-executorch: {exc}") from None

    def _prepare_device(self, program: Path, inputs, settings: RunSettings) -> None:
        adb, work = self.adb, str(self.cfg["work_dir"]).rstrip("/")
        adb.shell(["mkdir", "-p", work], check=True)
        self.device_info = self._device_info()
        self.binary = self._runner_binary(work)
        probe = adb.shell([self.binary, "--help"])
        self.flags = parse_flags(probe.output)
        if "model_path" not in self.flags or "num_executions" not in self.flags:
            raise RunnerUnavailable(f"android-executorch: {self.binary} --help lists no --model_path / "
                                    f"--num_executions: not ExecuTorch's executor_runner, or it cannot run on this "
                                    f"device ({_error_line(probe.output)})")
        self.remote_program = f"{work}/{program.name}"
        adb.push(program, self.remote_program)
        self.pushed.append(self.remote_program)
        self.program_name = program.name
        args = [self.binary, f"--model_path={self.remote_program}"]
        if "print_output" in self.flags:
            args.append("--print_output=none")
        if "cpu_threads" in self.flags:
            args.append(f"--cpu_threads={settings.threads}")
            self.notes.append(f"threads: --cpu_threads={settings.threads} (executor_runner resizes the XNNPACK "
                              "threadpool to it; 1 runs without the pool)")
        else:
            self.notes.append(f"threads: this executor_runner has no --cpu_threads flag, so the requested "
                              f"{settings.threads} was not applied; the threadpool keeps its built-in size")
        if "inputs" in self.flags and inputs is not None:
            args.append("--inputs=" + ",".join(self._push_inputs(inputs, work)))
            self.notes.append("inputs: the profiled batch, pushed as raw files (--inputs; float32 / int64)")
        else:
            self.notes.append("inputs: executor_runner's own (all ones): "
                              + ("it has no --inputs flag" if "inputs" not in self.flags else "no batch was given"))
        self.base_args = args
        self._check_time_command()
        if self.cfg["dumpsys_unplug"]:
            adb.shell(["dumpsys", "battery", "unplug"], check=True)
            self.unplugged = True
            self.notes.append("`dumpsys battery unplug`: Android behaved as if on battery (the charger still "
                              "charges; reset in close())")

    def _device_info(self) -> dict:
        keys = ("ro.product.model", "ro.build.version.release", "ro.product.cpu.abi", "ro.build.fingerprint")
        result = self.adb.script([["getprop", k] for k in keys])
        values = result.stdout.splitlines() + [""] * len(keys)
        return {k: v.strip() for k, v in zip(keys, values)}

    def _runner_binary(self, work: str) -> str:
        host = str(self.cfg.get("executor_runner_host") or "")
        if host:
            local = Path(host).expanduser()
            if not local.is_file():
                raise RunnerUnavailable(f"android-executorch: executor_runner_host = {host!r} does not exist: build "
                                        "executor_runner for Android arm64 or fix the path in the [adb] table")
            remote = f"{work}/executor_runner"
            self.adb.push(local, remote)
            self.adb.shell(["chmod", "755", remote], check=True)
            return remote
        remote = str(self.cfg["executor_runner"])
        if self.adb.shell(["test", "-x", remote]).returncode != 0:
            raise RunnerUnavailable(f"android-executorch: no executable {remote} on {self.adb.serial}: build "
                                    "executor_runner for Android arm64 and `adb push` it there (chmod 755), or set "
                                    "executor_runner_host in the [adb] table to push it from the host")
        return remote

    def _push_inputs(self, inputs, work: str) -> list[str]:
        arrays = [np.asarray(inputs[k]) for k in TEXT_INPUTS] if isinstance(inputs, dict) else [np.asarray(inputs)]
        remote = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, a in enumerate(arrays):
                a = np.ascontiguousarray(a.astype("<i8" if a.dtype.kind in "iub" else "<f4", copy=False))
                local = Path(tmp) / f"input_{i}.bin"
                local.write_bytes(a.tobytes())
                remote.append(f"{work}/input_{i}.bin")
                self.adb.push(local, remote[-1])
                self.pushed.append(remote[-1])
        return remote

    def _check_time_command(self) -> None:
        command = list(self.cfg["time_command"] or [])
        if not command:
            self.memory_reason = "time_command is empty in the [adb] table"
            return
        probe = self.adb.shell([*command, "true"])
        if _MAX_RSS.search(probe.output):
            self.time_command = command
        else:
            self.memory_reason = (f"`{' '.join(command)}` printed no maximum RSS on this device "
                                  f"({_error_line(probe.output)})")

    # -- run ---------------------------------------------------------------------------------------------------------

    def _command(self, executions: int) -> list[str]:
        return [*self.time_command, *self.base_args, f"--num_executions={executions}"]

    def _invoke(self, executions: int, processes: int = 1) -> tuple[RunnerOutput, float, float]:
        """Run `processes` executor_runner processes of `executions` each in one adb shell call; returns what they
        reported and the host window (t0, t1) around that call."""
        timeout = float(self.cfg["run_timeout_s"])
        marker = f"{LOG_TAG}-{uuid.uuid4().hex[:12]}"
        if self.log_source in (None, "logcat"):  # a marker in logcat, outside the window, to read only what follows
            self.adb.shell(["log", "-t", LOG_TAG, marker])
        command = self._command(executions)
        t0 = time.monotonic()
        if processes == 1:
            result = self.adb.shell(command, timeout=timeout)
        else:
            result = self.adb.script([command], timeout=timeout, repeat=processes)
        t1 = time.monotonic()
        if result.returncode != 0:
            raise RunnerUnavailable(f"android-executorch: executor_runner failed on {self.adb.serial} "
                                    f"(exit {result.returncode}) running {self.program_name}: "
                                    f"{_error_line(result.output)}")
        stdio = parse_runner_output(result.output)
        if self.log_source == "stdio" or (self.log_source is None and stdio.has_timings):
            self.log_source = "stdio"
            return stdio, t0, t1
        logged = parse_runner_output(self._logcat_since(marker))
        logged.max_rss_kib = stdio.max_rss_kib  # the time command writes to stderr, not to logcat
        if self.log_source is None and logged.has_timings:
            self.log_source = "logcat"
        return logged, t0, t1

    def _logcat_since(self, marker: str) -> str:
        result = self.adb.shell(["logcat", "-d", "-v", "raw", "-s", f"{LOG_TAG}:I", "ExecuTorch:I"])
        lines = result.stdout.splitlines()
        starts = [i for i, line in enumerate(lines) if line.strip() == marker]
        return "\n".join(lines[starts[-1] + 1:]) if starts else ""

    def _separate_warmup(self, warmup: int) -> None:
        """A warm-up invocation of its own; the first one also learns where and how the runner reports."""
        out, _, _ = self._invoke(max(1, warmup))
        if not out.has_timings:
            where = "on stdout/stderr" + ("" if self.log_source == "stdio" else " or in logcat (tag ExecuTorch)")
            raise RunnerUnavailable(f"android-executorch: {self.binary} printed no timings {where}: {BUILD_HINT}")
        if self.mode is None:
            self.mode = "per_iteration" if out.iterations else "total_only"
        self._learn(out)

    def _learn(self, out: RunnerOutput) -> None:
        if out.iterations:
            self.estimate_ms = float(np.mean(out.iterations))
        elif out.totals:
            self.estimate_ms = sum(ms for _, ms in out.totals) / max(1, sum(n for n, _ in out.totals))
        if out.threads:
            self.reported_threads = out.threads[-1]
        if out.load_ms:
            self.load_ms = out.load_ms[-1]
        if out.max_rss_kib:
            self.peak_rss_kib = max(self.peak_rss_kib or 0, *out.max_rss_kib)

    def _timed_count(self, settings: RunSettings) -> tuple[int, str | None]:
        n = calls_covering(settings.iters, settings.min_seconds, self.estimate_ms)
        if n > settings.iters:
            return n, (f"{n} timed executions instead of {settings.iters}, to cover min_seconds = "
                       f"{settings.min_seconds:g} at the {self.estimate_ms:.3f} ms per execution seen so far")
        return n, None

    def run(self, settings: RunSettings) -> Timing:
        if self.adb is None:
            raise RunnerUnavailable("android-executorch: run() before prepare()")
        notes = list(self.notes)
        warm = calls_covering(settings.warmup, settings.warmup_seconds, self.estimate_ms)
        if self.mode is None or (self.mode == "total_only" and warm > 0):
            self._separate_warmup(warm)
        if self.mode == "per_iteration":
            warm = calls_covering(settings.warmup, settings.warmup_seconds, self.estimate_ms)
        if warm > settings.warmup:
            notes.append(f"{warm} warm-up executions instead of {settings.warmup}, to cover warmup_seconds = "
                         f"{settings.warmup_seconds:g} at the {self.estimate_ms:.3f} ms per execution seen so far")
        n, extended = self._timed_count(settings)
        if extended:
            notes.append(extended)
        if self.mode == "per_iteration":
            out, t0, t1 = self._invoke(warm + n)
            if len(out.iterations) != warm + n:
                raise RunnerUnavailable(f"android-executorch: expected {warm + n} 'Iteration' lines from "
                                        f"executor_runner, got {len(out.iterations)} (output cut short?)")
            times = out.iterations[warm:]
            notes.append(f"per-execution times from executor_runner's 'Iteration i of N: X ms' lines "
                         f"(Method::execute() alone, the device's steady clock); the first {warm} "
                         f"executions of the same process were warm-up and are excluded")
            covers = (f"one adb shell call: the adb round trip, executor_runner's process start and exit, program "
                      f"load{self._load_text(out)}, {warm} warm-up executions, input preparation before "
                      f"each execution, and the {n} timed executions")
        else:
            out, t0, t1 = self._invoke(1, processes=n)
            if len(out.totals) != n or any(k != 1 for k, _ in out.totals):
                raise RunnerUnavailable(f"android-executorch: expected {n} 'Model executed successfully 1 time(s)' "
                                        f"lines, got {len(out.totals)} (output cut short?)")
            times = [ms for _, ms in out.totals]
            notes.append("this executor_runner prints only a total per process ('Model executed successfully N "
                         "time(s) in X ms'), no per-iteration times: each timed call was a process of its own running "
                         "one execution, so every time is real but is the first execution after loading the program "
                         f"(no in-process warm-up); {warm} warm-up executions ran in a separate process "
                         "before them")
            covers = (f"one adb shell call running {n} executor_runner processes back to back: each one's process "
                      "start, program load, one timed execution and exit, plus the adb round trip")
        self._learn(out)
        if self.log_source == "logcat":
            notes.append("timings read from logcat (tag ExecuTorch: the runner was built with the Android PAL)")
        if self.reported_threads is not None:
            notes.append(f"executor_runner reported 'Resetting threadpool with num threads = {self.reported_threads}'")
        elif "cpu_threads" in self.flags:
            notes.append("executor_runner logged no threadpool reset: built without ET_USE_THREADPOOL, its "
                         "--cpu_threads has no effect")
        window_ms = (t1 - t0) * 1e3
        notes.append(f"the host window ({window_ms:.1f} ms) exceeds the timed executions ({sum(times):.1f} ms) by "
                     f"{window_ms - sum(times):.1f} ms: see window_covers")
        return Timing(times, t0, t1, settings.batch, notes=notes, window_covers=covers)

    def _load_text(self, out: RunnerOutput) -> str:
        return f" ({out.load_ms[-1]:.1f} ms as the runner logged it)" if out.load_ms else ""

    # -- after -------------------------------------------------------------------------------------------------------

    def memory(self) -> dict:
        if self.peak_rss_kib is None:
            return {"peak_rss_bytes": None,
                    "reason": self.memory_reason or "the time command printed no maximum RSS for executor_runner"}
        return {"peak_rss_bytes": self.peak_rss_kib * 1024,
                "peak_covers": "the executor_runner process on the device (ru_maxrss from "
                               f"`{' '.join(self.time_command)}`): program load, warm-up and timed executions; the "
                               "largest over every invocation",
                "note": "a native process: the runtime, XNNPACK's packed weights and the memory-planned buffers, "
                        "no Python"}

    def info(self) -> dict:
        return {"device": self.adb.serial if self.adb else None, **self.device_info,
                "executor_runner": getattr(self, "binary", None), "executor_runner_flags": sorted(self.flags),
                "program": getattr(self, "program_name", None),
                "timing": {"per_iteration": "per-iteration log lines of one process",
                           "total_only": "one process per timed call"}.get(self.mode or "", None),
                "log_source": self.log_source, "threads_reported": self.reported_threads,
                "program_load_ms": self.load_ms, "backend": "XnnpackBackend (in the program; the runner must be "
                                                            "built with EXECUTORCH_BUILD_XNNPACK=ON)"}

    def close(self) -> None:
        if self.adb is None:
            return
        try:
            if self.unplugged:
                self.adb.shell(["dumpsys", "battery", "reset"])
                self.unplugged = False
            if self.cfg["cleanup"] and self.pushed:
                self.adb.shell(["rm", "-f", *self.pushed])
        except AdbError:
            pass  # the device may be gone; nothing left to undo from here
