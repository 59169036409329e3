"""How to measure on each kind of device, read from `profiles/<kind>.toml`.

A profile names the device's runners, its power meter (registry name plus the meter's own settings: where it
lives, units, update interval, how to form a board total), the commands that pin clocks for stable numbers, and the
state recorded with every result (governor, nvpmodel mode, throttle counters).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from hpqdeploy.errors import UserError
from hpqdeploy.resources import resource_dir

PROFILES_DIR = resource_dir("profiles")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    transport: str  # "local": measured in this process | "adb": driven from the host over adb
    runners: tuple[str, ...]  # runner names this device has (the first is the default)
    meter: str | None  # power meter registry name, None: the device kind has no meter
    meter_config: dict = field(default_factory=dict)  # the [meter] table minus `name`
    pin_clocks: tuple[tuple[str, ...], ...] = ()  # argument lists, run only with --pin-clocks
    state_files: dict[str, str] = field(default_factory=dict)  # label -> path or glob, read and recorded
    state_commands: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label -> argument list, output recorded
    throttle_files: tuple[str, ...] = ()  # globs of cumulative throttle counters, summed before and after the run
    extra: dict = field(default_factory=dict)  # transport-specific settings (e.g. [adb])


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name: str) -> DeviceProfile:
    path = PROFILES_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown device kind {name!r}; known: {', '.join(profile_names())}")
    try:
        blob = tomllib.loads(path.read_text())
        meter = dict(blob.get("meter", {}))
        clocks = blob.get("clocks", {})
        return DeviceProfile(
            name=blob["name"],
            description=blob.get("description", ""),
            transport=blob.get("transport", "local"),
            runners=tuple(blob["runners"]),
            meter=meter.pop("name", None),
            meter_config=meter,
            pin_clocks=tuple(tuple(c) for c in clocks.get("pin", [])),
            state_files=dict(clocks.get("state_files", {})),
            state_commands={k: tuple(v) for k, v in clocks.get("state_commands", {}).items()},
            throttle_files=tuple(clocks.get("throttle_files", [])),
            extra={k: v for k, v in blob.items() if k not in
                   {"name", "description", "transport", "runners", "meter", "clocks"}},
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a valid device profile ({exc})") from None


def collapse_state(values: dict[str, str]):
    """A state file pattern's readings: one value when every file agrees (the usual case for per-CPU files), else
    the per-file mapping."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values
