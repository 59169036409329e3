"""NVIDIA's `trtexec` as a runner: the TensorRT engine (`model.plan`) timed by TensorRT's own benchmark tool.

On a Jetson, trtexec ships with JetPack at /usr/src/tensorrt/bin/trtexec (not on PATH by default). Its flags moved
between the releases JetPack carries, so the command is built for the version trtexec reports in its banner
(`&&&& RUNNING TensorRT.trtexec [TensorRT v100300]`: 8502 is 8.5.2 = major*1000 + minor*100 + patch up to 8.x,
100300 is 10.3.0 = major*10000 + minor*100 + patch from 10.x):

- TensorRT 8.5 (JetPack 5.1) and 8.6 (JetPack 6.0): weakly typed; a Q/DQ model's quantization is honoured only with
  `--int8` (explicit quantization, no calibration); `--workspace` was replaced by `--memPoolSize` in 8.4;
  `--explicitBatch` is implied by ONNX and never passed (removed in 10);
- TensorRT 10 (JetPack 6.1/6.2 carry 10.3): `--stronglyTyped` takes every precision from the Q/DQ nodes;
- TensorRT 11: every network is strongly typed; `--stronglyTyped` is no longer needed and the precision and
  implicit-calibration flags (`--fp16`, `--int8`, `--calib`, ...) are gone.

Timing: trtexec runs with `--warmUp=0 --iterations=<warm-up + timed calls>` and `--exportTimes=FILE`, which holds one
record per iteration: `startEnqMs`/`endEnqMs` (host) and `startH2dMs` ... `endD2hMs` (CUDA events), all in ms from the
moment trtexec starts inferring, plus `h2dMs`, `computeMs`, `d2hMs` and `latencyMs` (= H2D + compute + D2H). Releases
differ in the file: the 10.x sources leave trtexec's own warm-up records out and drop `endToEndMs`, older ones keep both
(with `--warmUp=0` there are no such records). The first `warmup` records, and every record that started within
`warmup_seconds` of the inference start, are dropped here (`--duration` grows by `warmup_seconds`), so warm-up means the
same as on the in-process runners. The timed window is placed on the host clock at the moment trtexec's "Starting
inference" log line arrives (trtexec takes its time origin right after printing it; it runs under `stdbuf -oL` where
that exists so the line is not held in a buffer), so the window holds the timed iterations only, not process start,
engine load or warm-up; if the line never appears, the window falls back to the whole process and `Timing.window_covers`
says so.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpqdeploy.device.runners.base import (Runner, RunnerUnavailable, RunSettings, Timing, calls_covering,
                                           register_runner)
from hpqdeploy.errors import UserError
from hpqdeploy.lower.tensorrt_rt import BUILD_SCRIPT, ENGINE_FILE, MODEL_FILE

JETPACK_DIRS = ("/usr/src/tensorrt/bin",)  # where JetPack installs trtexec
BANNER_RE = re.compile(r"\[TensorRT v(\d{4,7})\]")
DOTTED_RE = re.compile(r"TensorRT version:?\s*v?(\d+)\.(\d+)\.(\d+)", re.IGNORECASE)
INFER_START_RE = re.compile(r"\bStarting inference\b")
ERROR_RE = re.compile(r"\bError\b|\bFAILED\b", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> TrtVersion | None:
    """TensorRT's version from trtexec output: the `[TensorRT vNNNN]` banner, else a `TensorRT version: x.y.z` line."""
    m = BANNER_RE.search(text)
    if m:
        n = int(m.group(1))
        if n >= 100000:  # 10.x on: major*10000 + minor*100 + patch
            return TrtVersion(n // 10000, n // 100 % 100, n % 100)
        return TrtVersion(n // 1000, n // 100 % 10, n % 100)  # up to 8.x: major*1000 + minor*100 + patch
    m = DOTTED_RE.search(text)
    return TrtVersion(*map(int, m.groups())) if m else None


def find_trtexec(binary: str | None = None) -> str | None:
    """`binary` (a path or a name on PATH), else `trtexec` on PATH, else JetPack's /usr/src/tensorrt/bin/trtexec."""
    found = shutil.which(binary or "trtexec")
    if found or binary:
        return found
    for d in JETPACK_DIRS:
        candidate = Path(d) / "trtexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def detect_version(exe: str, timeout: float = 60) -> TrtVersion:
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunnerUnavailable(f"trtexec runner: cannot run {exe} --help ({exc})") from None
    version = parse_version(out.stdout + out.stderr)
    if version is None:
        raise RunnerUnavailable(f"trtexec runner: {exe} --help printed no '[TensorRT vNNNN]' banner; cannot tell "
                                "which TensorRT it is")
    return version


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def shapes_flag(shapes: dict[str, tuple]) -> str:
    return ",".join(f"{name}:{_dims(shape)}" for name, shape in shapes.items())


def build_command(exe: str, version: TrtVersion, onnx: Path, plan: Path,
                  shapes: dict[str, tuple[tuple, tuple, tuple]] | None = None,
                  workspace_mib: int | None = None, fp16: bool = False) -> list[str]:
    """The trtexec command that builds `plan` from the Q/DQ `onnx` on this TensorRT version (strongly typed where
    the version has it). `shapes`: name -> (min, opt, max) shapes of the optimization profile."""
    cmd = [exe, f"--onnx={onnx}", f"--saveEngine={plan}"]
    if version.major >= 11:
        pass  # strong typing is always on; --stronglyTyped is no longer needed, precision flags are gone
    elif version.major >= 9:
        cmd.append("--stronglyTyped")
    else:  # 8.x: weakly typed; Q/DQ layers run in INT8 only when INT8 is enabled (explicit quantization)
        cmd.append("--int8")
    if fp16:
        if version.major >= 9:
            raise ValueError(f"--fp16 is a weak-typing flag; TensorRT {version} takes every precision from the model")
        cmd.append("--fp16")
    if shapes:
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            cmd.append(f"{flag}={shapes_flag({n: s[i] for n, s in shapes.items()})}")
    if workspace_mib:
        cmd.append(f"--workspace={workspace_mib}" if (version.major, version.minor) < (8, 4)
                   else f"--memPoolSize=workspace:{workspace_mib}")
    return cmd


def run_command(exe: str, version: TrtVersion, plan: Path, export_times: Path, iterations: int,
                min_seconds: float = 0.0, shapes: dict[str, tuple] | None = None,
                input_files: dict[str, Path] | None = None) -> list[str]:
    """The trtexec command that times `plan`: no time-based warm-up (the caller drops its warm-up iterations from
    the exported times), `iterations` iterations and at least `min_seconds`, one record per iteration in
    `export_times`. The same flags exist in 8.x, 10.x and 11.x (8.x reads --duration as whole seconds)."""
    cmd = [exe, f"--loadEngine={plan}", "--warmUp=0", f"--iterations={iterations}",
           f"--duration={math.ceil(min_seconds) if min_seconds > 0 else 0}", f"--exportTimes={export_times}"]
    if shapes:
        cmd.append(f"--shapes={shapes_flag(shapes)}")
    if input_files:
        cmd.append("--loadInputs=" + ",".join(f"{name}:{path}" for name, path in input_files.items()))
    return cmd


def warmup_records(records: list[dict], settings: RunSettings) -> int:
    """How many of trtexec's first records are warm-up: `warmup` of them, and every one that started within
    `warmup_seconds` of trtexec's inference start (its `startEnqMs` clock)."""
    by_time = sum(1 for r in records if float(r.get("startEnqMs", float("inf"))) < settings.warmup_seconds * 1e3)
    return max(settings.warmup, by_time)


def parse_export_times(path: Path) -> list[dict]:
    """The per-iteration records trtexec wrote with --exportTimes (each with latencyMs, computeMs, ...)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunnerUnavailable(f"trtexec wrote no timing file {path}") from None
    except json.JSONDecodeError as exc:
        raise RunnerUnavailable(f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    records = [r for r in data if isinstance(r, dict) and "latencyMs" in r] if isinstance(data, list) else []
    if not records:
        raise RunnerUnavailable(f"{path} holds no per-iteration latencyMs records")
    return records


def shapes_from_build_script(path: Path) -> dict[str, tuple[tuple, tuple, tuple]]:
    """name -> (min, opt, max) from the --minShapes/--optShapes/--maxShapes of the export's build_engine.sh."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    found = {}
    for flag in ("minShapes", "optShapes", "maxShapes"):
        m = re.search(rf"--{flag}=(\S+)", text)
        if not m:
            return {}
        found[flag] = {}
        for spec in m.group(1).split(","):
            name, _, dims = spec.rpartition(":")
            found[flag][name] = tuple(int(d) for d in dims.split("x"))
    return {n: (found["minShapes"][n], found["optShapes"][n], found["maxShapes"][n]) for n in found["minShapes"]}


@dataclass
class _Exec:
    command: list[str]
    returncode: int
    lines: list[str]
    t_spawn: float
    t_end: float
    t_infer: float | None  # host time the "Starting inference" line arrived
    peak_rss_bytes: int | None
    log: Path

    def error_line(self) -> str:
        """trtexec's first `[E]` line, else its first line naming an error or failure, else its last line."""
        errors = [line.strip() for line in self.lines if "[E]" in line]
        errors = errors or [line.strip() for line in self.lines
                            if ERROR_RE.search(line) and not line.startswith("&&&& RUNNING")]
        line = errors[0] if errors else (self.lines[-1].strip() if self.lines else "no output")
        return line[:300]


def _execute(cmd: list[str], log: Path, timeout: float, cwd: Path) -> _Exec:
    """Run trtexec, stamping when its inference starts; peak RSS from wait4."""
    stdbuf = shutil.which("stdbuf")  # trtexec's std::cout goes through stdio: line-buffer it so lines arrive on time
    argv = [stdbuf, "-oL", *cmd] if stdbuf else cmd
    t_spawn = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1, cwd=cwd)
    except OSError as exc:
        raise RunnerUnavailable(f"trtexec runner: cannot start {cmd[0]}: {exc.strerror or exc}") from None
    lines: list[str] = []
    stamp: dict[str, float] = {}
    waited: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if "infer" not in stamp and INFER_START_RE.search(line):
                stamp["infer"] = time.monotonic()
            lines.append(line.rstrip("\n"))

    def wait() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        waited.update(t=time.monotonic(), code=os.waitstatus_to_exitcode(status), usage=usage)

    reader = threading.Thread(target=read, name="trtexec-log", daemon=True)
    waiter = threading.Thread(target=wait, name="trtexec-wait", daemon=True)
    reader.start()
    waiter.start()
    waiter.join(timeout)
    if waiter.is_alive():
        proc.kill()
        waiter.join()
        proc.returncode = waited.get("code")
        reader.join(5)
        proc.stdout.close()
        log.write_text("\n".join(lines) + "\n")
        raise RunnerUnavailable(f"trtexec did not finish within {timeout:g} s (killed); log: {log}")
    proc.returncode = waited["code"]  # reaped by wait4: keep Popen from waiting again
    reader.join(5)
    proc.stdout.close()
    log.write_text("\n".join(lines) + "\n")
    return _Exec(cmd, waited["code"], lines, t_spawn, waited["t"], stamp.get("infer"),
                 waited["usage"].ru_maxrss * 1024, log)


@dataclass
class _Settings:
    binary: str | None = None
    build_engine: bool = True  # build model.plan from model.onnx when the artifact has none
    workspace_mib: int | None = None
    fp16: bool = False  # 8.x only: let the float parts run in half precision
    timeout_s: float = 1800.0
    keep_workdir: bool = False
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def from_profile(cls, extra: dict) -> _Settings:
        table = dict(extra.get("trtexec", {}))
        known = {k: table.pop(k) for k in list(table) if k in cls.__dataclass_fields__}
        if table:
            raise UserError(f"device profile [trtexec]: unknown setting(s) {', '.join(sorted(table))}; known: "
                            f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**known)


@register_runner("trtexec")
class TrtexecRunner(Runner):
    """`model.plan` timed by trtexec in its own process (the engine is built here from model.onnx if missing)."""

    runtime = "tensorrt"

    def __init__(self, profile_extra: dict | None = None):
        super().__init__(profile_extra)
        self.settings = _Settings.from_profile(self.profile_extra)
        self.workdir: Path | None = None
        self.last: _Exec | None = None
        self.notes: list[str] = []
        self.period_ms: float | None = None  # time between iteration starts in the last run

    def prepare(self, artifact_dir: Path, inputs, settings: RunSettings) -> None:
        exe = find_trtexec(self.settings.binary)
        if exe is None:
            where = self.settings.binary or f"trtexec on PATH or in {', '.join(JETPACK_DIRS)}"
            raise RunnerUnavailable(f"trtexec runner: no {where} (it ships with TensorRT/JetPack)")
        self.exe, self.version = exe, detect_version(exe)
        if self.version.major < 8:
            raise RunnerUnavailable(f"trtexec runner: TensorRT {self.version} is too old (8.5 or later, JetPack 5.1+)")
        self.artifact_dir = Path(artifact_dir)
        self.workdir = Path(tempfile.mkdtemp(prefix="hpqdeploy-trtexec-"))
        self.notes = [f"trtexec from TensorRT {self.version} ({exe})"]
        self.plan = self._engine()
        self.shapes, self.input_files = self._inputs(inputs)

    def _engine(self) -> Path:
        plan, onnx = self.artifact_dir / ENGINE_FILE, self.artifact_dir / MODEL_FILE
        if plan.is_file():
            self.notes.append(f"engine: {plan} (built before; it must come from this TensorRT version and GPU)")
            return plan
        if not onnx.is_file():
            raise RunnerUnavailable(f"trtexec runner: {self.artifact_dir} has neither {ENGINE_FILE} nor {MODEL_FILE}; "
                                    "export it with the tensorrt runtime first")
        if not self.settings.build_engine:
            raise RunnerUnavailable(f"trtexec runner: {self.artifact_dir} has no {ENGINE_FILE}; build it on the "
                                    f"device with {BUILD_SCRIPT} or set build_engine = true in [trtexec]")
        if not os.access(self.artifact_dir, os.W_OK):
            plan = self.workdir / ENGINE_FILE
        shapes = shapes_from_build_script(self.artifact_dir / BUILD_SCRIPT)
        try:
            cmd = build_command(self.exe, self.version, onnx, plan, shapes, self.settings.workspace_mib,
                                self.settings.fp16)
        except ValueError as exc:
            raise RunnerUnavailable(f"trtexec runner: {exc}") from None
        self.last = run = _execute(cmd, self.workdir / "build.log", self.settings.timeout_s, self.workdir)
        if run.returncode != 0 or not plan.is_file():
            raise RunnerUnavailable(f"trtexec could not build {ENGINE_FILE} from {MODEL_FILE} (exit {run.returncode}): "
                                    f"{run.error_line()}; log: {run.log}")
        self.notes.append(f"engine built here in {run.t_end - run.t_spawn:.0f} s: {shlex.join(cmd)}")
        return plan

    def _input_dtypes(self) -> dict[str, np.dtype]:
        """Engine input dtypes from the ONNX graph (when `onnx` is installed): int64 becomes int32 before 10.x."""
        try:
            import onnx
            from onnx import helper

            model = onnx.load(str(self.artifact_dir / MODEL_FILE), load_external_data=False)
        except Exception:  # no onnx, no model file: fall back to the arrays' own dtypes
            return {}
        inits = {i.name for i in model.graph.initializer}
        return {i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                for i in model.graph.input if i.name not in inits}

    def _inputs(self, inputs) -> tuple[dict[str, tuple], dict[str, Path]]:
        dtypes = self._input_dtypes()
        if isinstance(inputs, dict):
            feeds = {name: np.asarray(v) for name, v in inputs.items()}
        else:
            names = list(dtypes) or list(shapes_from_build_script(self.artifact_dir / BUILD_SCRIPT))
            if not names:
                raise RunnerUnavailable(f"trtexec runner: cannot tell the engine's input name (no {MODEL_FILE} "
                                        f"readable and no {BUILD_SCRIPT}); pass the inputs as a dict")
            feeds = {names[0]: np.asarray(inputs)}
        shapes, files = {}, {}
        for i, (name, array) in enumerate(feeds.items()):
            dtype = dtypes.get(name, array.dtype)
            if self.version.major < 10 and dtype == np.int64:
                dtype = np.dtype(np.int32)  # TensorRT 8.x casts INT64 inputs to INT32
            path = self.workdir / f"input{i}.bin"
            np.ascontiguousarray(array, dtype=dtype).tofile(path)
            shapes[name], files[name] = tuple(array.shape), path
        self.notes.append("inputs: the given batch, loaded with --loadInputs (not trtexec's random values)")
        return shapes, files

    def run(self, settings: RunSettings) -> Timing:
        times_file = self.workdir / "times.json"
        times_file.unlink(missing_ok=True)
        cmd = run_command(self.exe, self.version, self.plan, times_file,
                          calls_covering(settings.warmup, settings.warmup_seconds, self.period_ms) + settings.iters,
                          settings.min_seconds + settings.warmup_seconds, self.shapes, self.input_files)
        self.last = run = _execute(cmd + list(self.settings.extra_args), self.workdir / "run.log",
                                   self.settings.timeout_s, self.workdir)
        if run.returncode != 0:
            raise RunnerUnavailable(f"trtexec failed (exit {run.returncode}): {run.error_line()}; log: {run.log}")
        records = parse_export_times(times_file)
        warm = warmup_records(records, settings)
        kept = records[warm:]
        if not kept:
            raise RunnerUnavailable(f"trtexec ran {len(records)} iterations, none after the {warm} warm-up ones")
        starts = [float(r["startEnqMs"]) for r in records if "startEnqMs" in r]
        if len(starts) > 1:
            self.period_ms = (starts[-1] - starts[0]) / (len(starts) - 1)
        times = [float(r["latencyMs"]) for r in kept]
        notes = list(self.notes)
        compute = [float(r["computeMs"]) for r in kept if "computeMs" in r]
        notes.append("per call: latencyMs = H2D + GPU compute + D2H of one iteration (trtexec --exportTimes)"
                     + (f"; GPU compute median {float(np.median(compute)):.4g} ms" if compute else ""))
        if len(kept) < settings.iters:
            notes.append(f"{len(kept)} timed iterations, not {settings.iters}: warm-up by time "
                         f"(warmup_seconds = {settings.warmup_seconds:g}) took more iterations than estimated")
        notes.append(f"warm-up: trtexec --warmUp=0, the first {warm} of its {len(records)} iterations "
                     "dropped here; trtexec double-buffers, so one iteration's copies overlap the next one's compute")
        if settings.threads != 1:
            notes.append(f"threads={settings.threads} does not apply: the engine runs on the GPU")
        t0, t1, covers = self._window(run, kept, warm)
        if settings.min_seconds and t1 - t0 < settings.min_seconds:
            notes.append(f"timed part lasted {t1 - t0:.3g} s, under min_seconds={settings.min_seconds:g} "
                         "(trtexec's --duration also counts the warm-up iterations)")
        return Timing(times, t0, t1, settings.batch, notes, covers)

    @staticmethod
    def _window(run: _Exec, kept: list[dict], warmup: int) -> tuple[float, float, str]:
        starts = [float(kept[0][k]) for k in ("startEnqMs", "startH2dMs") if k in kept[0]]
        ends = [float(r[k]) for r in kept for k in ("endD2hMs", "endComputeMs") if k in r]
        if run.t_infer is not None and starts and ends:
            t0 = max(run.t_infer, run.t_infer + min(starts) / 1000)
            t1 = min(run.t_end, run.t_infer + max(ends) / 1000)
            if t1 > t0:
                return t0, t1, (f"timed iterations only: trtexec's own per-iteration times (--exportTimes, ms from its "
                                f"inference start) placed on the host clock when its 'Starting inference' line "
                                f"arrived; process start, engine load and the {warmup} warm-up iterations are outside")
        return run.t_spawn, run.t_end, ("the whole trtexec process: start-up, engine deserialization, warm-up and "
                                        "timed iterations (its own times could not be placed on the host clock)")

    def memory(self) -> dict:
        if self.last is None or self.last.peak_rss_bytes is None:
            return {"peak_rss_bytes": None, "reason": "trtexec has not run"}
        return {"peak_rss_bytes": self.last.peak_rss_bytes,
                "peak_covers": "the trtexec process: engine deserialization + warm-up + timed run",
                "note": "CPU resident set of trtexec (wait4); on Jetson, CUDA buffers live in the shared DRAM and are "
                        "not all counted in it"}

    def info(self) -> dict:
        info = {"runtime": "tensorrt", "runner": "trtexec", "version": str(getattr(self, "version", "")),
                "trtexec": getattr(self, "exe", None), "engine": ENGINE_FILE}
        if self.last is not None:
            info["command"] = shlex.join(self.last.command)
        return info

    def close(self) -> None:
        failed = self.last is not None and self.last.returncode != 0
        if self.workdir is not None and not self.settings.keep_workdir and not failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
