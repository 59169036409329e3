"""`hpqdeploy profile`: latency, throughput, memory and energy of an exported artifact where it runs.

Method: the device's state is recorded (governor/nvpmodel, throttle counters before and after); the runner loads
the artifact; idle power is measured in its own window with the model loaded; then each repeat warms up and times
a fixed number of calls (or a minimum duration) while the power meter is sampled in a background thread, and the
energy over exactly that window is divided by the inferences it ran. Idle power is reported beside it, never
subtracted. Without a meter (or without permission) every energy field is null with the reason; latency is still
measured.
"""

from __future__ import annotations

import glob
import hashlib
import json
import statistics
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hpqdeploy import artifact, atomic, formats
from hpqdeploy.config import ProfileOptions
from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, get_meter
from hpqdeploy.device.meters.recorder import PowerRecorder
from hpqdeploy.device.profiles import DeviceProfile, collapse_state, load_profile
from hpqdeploy.device.runners.base import Runner, RunnerUnavailable, RunSettings, Timing, get_runner, runner_names
from hpqdeploy.errors import UserError

PROFILE_FILE = "profile.json"
COMMAND_TIMEOUT_S = 20


def latency_stats(times_ms: list[float], batch: int) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    return {"calls": int(t.size), "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()), "min_ms": float(t.min()),
            "max_ms": float(t.max()), "throughput_per_s": float(batch * t.size / (t.sum() / 1e3))}


def spread(values: list[float]) -> float:
    """(max - min) / median of per-repeat figures: 0.1 means the repeats lie within 10% of their median."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def _export_meta(export_dir: Path) -> dict:
    path = export_dir / "export.json"
    if not export_dir.is_dir() or not path.is_file():
        raise UserError(f"{export_dir} is not a `hpqdeploy export` output directory (no export.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt ({exc})") from None


def artifact_hash(export_dir: Path, meta: dict) -> str:
    """sha256 over the lowered files (names and bytes, sorted), not over export.json or build scripts."""
    h = hashlib.sha256()
    for name in sorted(meta.get("files", {})):
        if name == "export.json":
            continue
        h.update(name.encode() + b"\0")
        with (export_dir / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _candidate_runners(profile: DeviceProfile, runtime: str, name: str | None, serial: str | None) -> list[Runner]:
    """The runner asked for, or every runner of the device that runs this runtime's artifacts, in profile order."""
    extra = {**profile.extra, **({"serial": serial} if serial else {})}
    if name is not None:
        if name not in runner_names():
            raise UserError(f"unknown runner {name!r}; known: {', '.join(runner_names())}")
        runner = get_runner(name, extra)
        if runner.runtime != runtime:
            raise UserError(f"runner {name} runs {runner.runtime} artifacts; this one is for {runtime}")
        return [runner]
    runners = [r for r in (get_runner(c, extra) for c in profile.runners) if r.runtime == runtime]
    if not runners:
        raise UserError(f"device kind {profile.name} has no runner for {runtime} artifacts "
                        f"(its runners: {', '.join(profile.runners)})")
    return runners


def _prepare_first(runners: list[Runner], export_dir: Path, inputs, settings: RunSettings) -> tuple[Runner, list]:
    """Prepare the first runner that can run here; the ones that could not are recorded with their reasons."""
    skipped = []
    for runner in runners:
        try:
            runner.prepare(export_dir, inputs, settings)
            return runner, skipped
        except RunnerUnavailable as exc:
            skipped.append({"runner": runner.name, "reason": str(exc)})
    raise UserError("; ".join(f"{s['runner']}: {s['reason']}" if len(skipped) > 1 else s["reason"] for s in skipped))


def example_batch(meta: dict, batch: int, data_dir: str | None):
    """`batch` rows of the evaluation split of the artifact the export came from, as the runtime takes them."""
    from hpqdeploy.config import DataOptions
    from hpqdeploy.data import load_data
    from hpqdeploy.lower.export import fixed_collate, to_numpy

    source = Path(meta.get("source", ""))
    if not (source / "plan.json").is_file():
        raise UserError(f"the export's source artifact {source} is not here; profile needs it for example inputs")
    art = artifact.load(source)
    recorded = DataOptions(**art.plan["data"])
    data = replace(recorded, data_dir=data_dir or recorded.data_dir, eval_limit=max(batch, 8))
    splits = load_data(data.name, data.request(0))
    rows = [splits.eval[i % len(splits.eval)] for i in range(batch)]
    return to_numpy(fixed_collate(art.model)(rows)[0])


def read_state_files(patterns: dict[str, str]) -> dict:
    state = {}
    for label, pattern in patterns.items():
        values = {}
        for path in sorted(glob.glob(pattern)):
            try:
                values[path] = Path(path).read_text().strip()
            except OSError as exc:
                values[path] = f"unreadable: {exc.strerror}"
        state[label] = collapse_state(values) if values else None
    return state


def run_command(args: tuple[str, ...]) -> dict:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        return {"command": list(args), "error": f"{args[0]} not found"}
    except subprocess.TimeoutExpired:
        return {"command": list(args), "error": f"timed out after {COMMAND_TIMEOUT_S} s"}
    return {"command": list(args), "returncode": proc.returncode, "output": (proc.stdout + proc.stderr).strip()}


def throttle_count(patterns: tuple[str, ...]) -> int | None:
    total, found = 0, False
    for pattern in patterns:
        for path in glob.glob(pattern):
            try:
                total += int(Path(path).read_text().split()[0])
                found = True
            except (OSError, ValueError, IndexError):
                continue
    return total if found else None


def device_state(profile: DeviceProfile, serial: str | None) -> dict:
    if profile.transport == "adb":
        from hpqdeploy.device.adb import device_state as adb_state

        return adb_state(profile, serial)
    return {"files": read_state_files(profile.state_files),
            "commands": {k: run_command(v) for k, v in profile.state_commands.items()}}


def _pin_clocks(profile: DeviceProfile, serial: str | None) -> list[dict]:
    if profile.transport == "adb":
        from hpqdeploy.device.adb import pin_clocks

        return pin_clocks(profile, serial)
    return [run_command(c) for c in profile.pin_clocks]


def _meter_choice(profile: DeviceProfile, name: str | None) -> tuple[str | None, dict]:
    """The profile's [meter], or with --meter NAME its [meter_alternatives.NAME] table (or NAME's defaults)."""
    if name is None or name == profile.meter:
        return profile.meter, dict(profile.meter_config)
    config = dict(profile.extra.get("meter_alternatives", {}).get(name, {}))
    return config.pop("name", name), config


def _open_meter(profile: DeviceProfile, serial: str | None,
                choice: str | None = None) -> tuple[PowerMeter | None, str | None]:
    name, config = _meter_choice(profile, choice)
    if name is None:
        return None, f"device kind {profile.name} names no power meter"
    adb = profile.extra.get("adb", {}) if profile.transport == "adb" else {}  # the adb binary, timeouts, serial
    config = {**adb, **config, **({"serial": serial} if serial else {})}
    try:
        meter = get_meter(name, config)
    except KeyError as exc:
        raise UserError(f"profiles/{profile.name}.toml: {exc.args[0]}") from None
    try:
        meter.open()
    except MeterUnavailable as exc:
        return None, str(exc)
    return meter, None


def _measure_idle(meter: PowerMeter, seconds: float) -> dict:
    try:
        with PowerRecorder(meter) as rec:
            t0 = time.monotonic()
            time.sleep(seconds)
            t1 = time.monotonic()
        return rec.window(t0, t1).to_json()
    except MeterUnavailable as exc:
        return {"energy_j": None, "mean_power_w": None, "reason": str(exc)}


def _timed_repeat(runner: Runner, settings: RunSettings, meter: PowerMeter | None,
                  meter_reason: str | None) -> tuple[Timing, dict]:
    if meter is None:
        return runner.run(settings), {"energy_j": None, "energy_per_inference_j": None, "reason": meter_reason}
    with PowerRecorder(meter) as rec:
        timing = runner.run(settings)
    try:
        window = rec.window(timing.t0, timing.t1).to_json()
    except MeterUnavailable as exc:
        return timing, {"energy_j": None, "energy_per_inference_j": None, "reason": str(exc)}
    window["energy_per_inference_j"] = window["energy_j"] / timing.inferences
    window["inferences"] = timing.inferences
    window["window_covers"] = timing.window_covers
    return timing, window


def run_profile(export_dir: Path, out: Path, opts: ProfileOptions, command: str = "") -> dict:
    export_dir = Path(export_dir)
    meta = _export_meta(export_dir)
    profile = load_profile(opts.device)
    runners = _candidate_runners(profile, meta["runtime"], opts.runner, opts.serial)
    atomic.check_output(out)
    inputs = example_batch(meta, opts.batch_size, opts.data_dir)
    settings = RunSettings(opts.batch_size, opts.threads, opts.warmup, opts.iters, opts.min_seconds,
                           opts.warmup_seconds)
    state_before = device_state(profile, opts.serial)
    pinned = _pin_clocks(profile, opts.serial) if opts.pin_clocks else []
    throttle_before = throttle_count(profile.throttle_files)
    meter, meter_reason = _open_meter(profile, opts.serial, opts.meter)
    runner = None
    try:
        runner, skipped = _prepare_first(runners, export_dir, inputs, settings)
        idle = _measure_idle(meter, opts.idle_seconds) if meter else {"mean_power_w": None, "reason": meter_reason}
        repeats = []
        for _ in range(opts.repeats):
            timing, energy = _timed_repeat(runner, settings, meter, meter_reason)
            repeats.append({**latency_stats(timing.times_ms, timing.batch), "energy": energy,
                            "notes": timing.notes, "times_ms": [round(t, 5) for t in timing.times_ms]})
        memory, runner_info = runner.memory(), runner.info()
    except RunnerUnavailable as exc:
        raise UserError(str(exc)) from None
    finally:
        if runner is not None:
            runner.close()
        if meter is not None:
            meter.close()
    all_times = [t for r in repeats for t in r["times_ms"]]
    energies = [r["energy"]["energy_per_inference_j"] for r in repeats
                if r["energy"].get("energy_per_inference_j") is not None]
    result = {
        "artifact": str(export_dir), "artifact_sha256": artifact_hash(export_dir, meta),
        "runtime": meta["runtime"], "method": meta.get("method"), "source": meta.get("source"),
        "device": {"kind": profile.name, "description": profile.description, "transport": profile.transport},
        "runner": {"name": runner.name, **runner_info, "skipped": skipped},
        "settings": asdict(settings), "repeats_requested": opts.repeats,
        "latency": {**latency_stats(all_times, opts.batch_size),
                    "p50_ms_per_repeat": [r["p50_ms"] for r in repeats],
                    "p50_spread": spread([r["p50_ms"] for r in repeats])},
        "energy": {"meter": meter.describe() if meter else {"meter": profile.meter, "unavailable": meter_reason},
                   "energy_per_inference_j": statistics.median(energies) if energies else None,
                   "energy_per_inference_j_per_repeat": energies or None,
                   "idle": idle, "reason": None if energies else (meter_reason or _first_reason(repeats))},
        "memory": memory,
        "state": {"before": state_before, "after": device_state(profile, opts.serial), "pin_clocks": pinned,
                  "throttle_count_before": throttle_before,
                  "throttle_count_after": throttle_count(profile.throttle_files)},
        "repeats": repeats,
        "command": command, **artifact.environment(),
    }
    result = formats.stamp(PROFILE_FILE, result)
    with atomic.directory(out) as work:
        (work / PROFILE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _first_reason(repeats: list[dict]) -> str | None:
    return next((r["energy"].get("reason") for r in repeats if r["energy"].get("reason")), None)
