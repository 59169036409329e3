"""Jetson's on-module INA3221 power monitors, read from the mainline `ina3221` hwmon driver (JetPack 5 and 6).

Each monitor is an I2C device under `/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/` with up to three
channels: `in<C>_label` (the rail's name), `in<C>_input` (bus voltage, mV) and `curr<C>_input` (current, mA). A
rail's power is V x I. Which rails exist and which form the board total depends on the module (Linux device trees
tegra234-p3767, tegra234-p3701, tegra194-p3668 and NVIDIA's Jetson Linux power guide):

- Orin Nano / Orin NX (p3767) and Xavier NX (p3668), one monitor at 0x40: VDD_IN (the module's input: the total),
  VDD_CPU_GPU_CV, VDD_SOC (both inside VDD_IN);
- AGX Orin (p3701): 0x40 carries VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0 (their sum is the module total) and 0x41
  carries VDDQ_VDD2_1V8AO on channel 2 (DRAM and always-on, fed from the 5 V system rail: not added again).

The profile names the total with `total_rails`; every labelled rail is still reported in `Reading.parts`. JetPack 4
used the `ina3221x` IIO driver instead (`iio:device*/in_power*_input`): not read here, use the `tegrastats` meter.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from pathlib import Path

from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading, register_meter

DEFAULT_ROOT = "/sys/bus/i2c/drivers/ina3221"
NOT_CONNECTED = ("NC",)  # AGX Orin's 0x41 labels unused channels "NC" on some BSPs
# errnos a disabled or powered-down channel answers with; such a channel is skipped at open, not fatal
_DISABLED = (errno.EIO, errno.ENODATA, errno.EINVAL, errno.EAGAIN)


@dataclass(frozen=True)
class Rail:
    name: str
    voltage: Path  # in<C>_input, millivolts
    current: Path  # curr<C>_input, milliamps
    where: str  # "1-0040/hwmon3 channel 1", for the record

    def watts(self) -> float:
        return _read_int(self.voltage) * _read_int(self.current) / 1e6


def _read_text(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: Path) -> int:
    try:
        text = _read_text(path).strip()
    except PermissionError:
        raise MeterUnavailable(f"power: cannot read {path}: permission denied (run as a user that can read the "
                               "INA3221 hwmon files, or mount /sys read-only into the container)") from None
    except FileNotFoundError:
        raise MeterUnavailable(f"power: {path} vanished (INA3221 driver unbound or device removed)") from None
    except OSError as exc:
        raise MeterUnavailable(f"power: reading {path} failed: {exc.strerror or exc}") from None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise MeterUnavailable(f"power: {path} holds {text[:40]!r}, not a number") from None


def _hwmon_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.glob("*/hwmon/hwmon*") if p.is_dir())
    except PermissionError:
        raise MeterUnavailable(f"power: cannot list {root}: permission denied") from None


def discover_rails(root: Path) -> tuple[dict[str, Rail], list[str]]:
    """Every labelled, readable channel under `root`, and one line per channel skipped (disabled, NC, unreadable)."""
    rails: dict[str, Rail] = {}
    skipped: list[str] = []
    for hwmon in _hwmon_dirs(root):
        device = f"{hwmon.parent.parent.name}/{hwmon.name}"
        for label_path in sorted(hwmon.glob("in*_label")):
            channel = label_path.name[2:-len("_label")]
            if not channel.isdigit():
                continue
            voltage, current = hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input"
            if not current.exists():  # in7_label is the shunt-voltage sum: no current of its own
                continue
            try:
                name = _read_text(label_path).strip()
            except PermissionError:
                raise MeterUnavailable(f"power: cannot read {label_path}: permission denied") from None
            except OSError as exc:
                skipped.append(f"{device} channel {channel}: label unreadable ({exc.strerror or exc})")
                continue
            where = f"{device} channel {channel}"
            if not name or name in NOT_CONNECTED:
                skipped.append(f"{where}: not connected ({name or 'no label'})")
                continue
            try:
                for path in (voltage, current):
                    _read_text(path)
            except PermissionError:
                raise MeterUnavailable(f"power: cannot read {current}: permission denied (run as a user that can "
                                       "read the INA3221 hwmon files)") from None
            except OSError as exc:
                if exc.errno in _DISABLED or isinstance(exc, FileNotFoundError):
                    skipped.append(f"{where} ({name}): disabled ({exc.strerror or exc})")
                    continue
                raise MeterUnavailable(f"power: reading {voltage} failed: {exc.strerror or exc}") from None
            if name in rails:
                name = f"{name}@{device}"
            rails[name] = Rail(name, voltage, current, where)
    return rails, skipped


@register_meter("ina3221")
class Ina3221Meter(PowerMeter):
    """Board power from the INA3221 rails in hwmon; config: `root`, `total_rails`, `interval_ms`."""

    kind = "power"

    def open(self) -> None:
        self.root = Path(self.config.get("root", DEFAULT_ROOT))
        if not self.root.is_dir():
            raise MeterUnavailable(f"power: no INA3221 found under {self.root} (not a Jetson with JetPack 5 or later; "
                                   "JetPack 4's ina3221x driver is read by the tegrastats meter)")
        self.rails, self.skipped = discover_rails(self.root)
        if not self.rails:
            raise MeterUnavailable(f"power: no INA3221 found under {self.root} (no labelled hwmon channel)")
        found = ", ".join(self.rails)
        total = self.config.get("total_rails")
        if total is None:
            if "VDD_IN" not in self.rails:
                raise MeterUnavailable(f"power: no VDD_IN rail to use as the board total; set total_rails in the "
                                       f"device profile's [meter] table (rails found: {found})")
            total = ["VDD_IN"]
        if isinstance(total, str) or not total:
            raise MeterUnavailable(f"power: total_rails must be a non-empty list of rail names, not {total!r}")
        missing = [r for r in total if r not in self.rails]
        if missing:
            raise MeterUnavailable(f"power: rail {', '.join(missing)} named in total_rails is not among the INA3221 "
                                   f"rails under {self.root} (found: {found}); fix total_rails in the device profile")
        self.total_rails = list(total)
        self.update_interval_ms = self._update_intervals()
        self.first = self.read()

    def _update_intervals(self) -> dict[str, int]:
        """The driver's conversion period per monitor (mainline `update_interval`, ms): faster reads repeat values."""
        out = {}
        for hwmon in _hwmon_dirs(self.root):
            path = hwmon / "update_interval"
            try:
                out[f"{hwmon.parent.parent.name}/{hwmon.name}"] = int(_read_text(path).split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return out

    def read(self) -> Reading:
        t = time.monotonic()
        parts = {name: rail.watts() for name, rail in self.rails.items()}
        return Reading(t=t, watts=sum(parts[r] for r in self.total_rails), parts=parts)

    def describe(self) -> dict:
        info = super().describe()
        info.update({
            "root": str(self.root),
            "units": "per channel: bus voltage in<C>_input (mV) x current curr<C>_input (mA) = W",
            "total_rails": self.total_rails,
            "rails": {name: rail.where for name, rail in self.rails.items()},
            "update_interval_ms": self.update_interval_ms,
        })
        if self.skipped:
            info["skipped_channels"] = self.skipped
        if "covers" in self.config:
            info["total_covers"] = self.config["covers"]
        slowest = max(self.update_interval_ms.values(), default=0)
        if slowest and slowest > self.interval_s * 1000:
            info["note"] = (f"the INA3221 converts every {slowest} ms; sampling every "
                            f"{self.interval_s * 1000:g} ms repeats values")
        return info
