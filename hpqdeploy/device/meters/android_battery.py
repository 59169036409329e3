"""Android power over adb: the battery's fuel gauge (`android-battery`) and Pixel's on-device power rails
(`android-odpm`).

`android-battery` (kind "power") reads `current_now` and `voltage_now` under /sys/class/power_supply/battery with one
`adb shell cat` per sample and reports the power the battery delivers, |I|·V. It covers the whole device (SoC,
memory, display, radios) but only while the battery alone supplies it: with a charger online (a USB cable to the
host counts) the battery's current is the device's draw minus the charge current, so the meter refuses unless
`allow_charging = true`, which it then records. Vendors disagree on the sign of `current_now` (Android's
BatteryManager convention is negative while discharging; many kernels report the opposite), so `current_sign`
says which, or "auto" learns it from a discharging battery when the meter opens. A sample costs one adb round trip
(tens of ms over USB), which therefore bounds the effective sampling interval; the meter measures it and reports
it, and stamps each reading at the midpoint of its round trip. The gauge itself updates at its own, device-specific
rate, so consecutive samples may repeat a value.

`android-odpm` (kind "energy") reads Pixel's ODPM rail counters, `/sys/bus/iio/devices/iio:device*/energy_value`:
a `t=<ms since boot>` line, then one `CH<n>(T=<ms>)[<RAIL>], <energy>` line per rail, the energy cumulative in
microwatt-seconds (µJ) as Pixel's power-stats HAL reads it. The total is the sum of the rails chosen (all by
default): SoC, memory and some radio rails, not the display or the whole device. Reading the files usually needs
root (`adb root` on a userdebug build); the reason says so when SELinux or permissions deny it.
"""

from __future__ import annotations

import re
import statistics
import time

from hpqdeploy.device.adb import Adb, AdbError, DeviceGone, connect
from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading, register_meter
from hpqdeploy.errors import UserError

SIGNS = ("discharge_negative", "discharge_positive", "auto")
_CURRENT_SCALE = {"uA": 1e-6, "mA": 1e-3}
_VOLTAGE_SCALE = {"uV": 1e-6, "mV": 1e-3}
_NOT_CHARGERS = {"Battery", "BMS", "Unknown"}  # power_supply types whose `online` does not mean a charger
_ODPM_LINE = re.compile(r"CH(\d+)\(T=(\d+)\)\[([^\]]+)\],\s*(\d+)")


class _AdbMeter(PowerMeter):
    """Shared plumbing: the adb connection (config `serial`, `adb`, `timeout_s`) and round-trip bookkeeping."""

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        self.adb: Adb | None = None
        self.round_trips_s: list[float] = []

    def _connect(self) -> Adb:
        try:
            settings = {k: self.config[k] for k in ("adb", "timeout_s") if k in self.config}
            return connect({"adb": settings}, self.config.get("serial"))
        except AdbError as exc:
            raise MeterUnavailable(f"{self.name}: {exc}") from None

    def _timed_shell(self, args: list[str]):
        """(result, host midpoint time) of one adb shell call; a vanished device becomes MeterUnavailable."""
        start = time.monotonic()
        try:
            result = self.adb.shell(args, timeout=float(self.config.get("read_timeout_s", 10)))
        except AdbError as exc:  # DeviceGone, AdbTimeout: the meter stops, the recorder records why
            raise MeterUnavailable(f"{self.name}: {exc}") from None
        end = time.monotonic()
        self.round_trips_s.append(end - start)
        return result, (start + end) / 2

    @property
    def interval_s(self) -> float:
        """The configured interval, or the measured adb round trip when that is longer (one sample per trip)."""
        configured = super().interval_s
        if not self.round_trips_s:
            return configured
        return max(configured, statistics.mean(self.round_trips_s[-20:]))

    def describe(self) -> dict:
        out = super().describe()
        out["configured_interval_ms"] = float(self.config.get("interval_ms", 100))
        if self.round_trips_s:
            out["adb_round_trip_ms"] = {"mean": round(statistics.mean(self.round_trips_s) * 1e3, 2),
                                        "max": round(max(self.round_trips_s) * 1e3, 2),
                                        "samples": len(self.round_trips_s)}
        out["timestamps"] = "host monotonic time at the midpoint of each sample's adb round trip"
        if self.adb is not None:
            out["device"] = self.adb.serial
        return out


@register_meter("android-battery")
class AndroidBatteryMeter(_AdbMeter):
    kind = "power"

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        c = self.config
        self.battery_dir = str(c.get("battery_dir", "/sys/class/power_supply/battery")).rstrip("/")
        self.supply_root = self.battery_dir.rsplit("/", 1)[0]
        self.sign_mode = c.get("current_sign", "auto")
        if self.sign_mode not in SIGNS:
            raise UserError(f"android-battery: current_sign must be one of {', '.join(SIGNS)}, not "
                            f"{self.sign_mode!r}")
        for key, scales in (("current_unit", _CURRENT_SCALE), ("voltage_unit", _VOLTAGE_SCALE)):
            if c.get(key, next(iter(scales))) not in scales:
                raise UserError(f"android-battery: {key} must be one of {', '.join(scales)}, not {c[key]!r}")
        self.amps_per_unit = _CURRENT_SCALE[c.get("current_unit", "uA")]
        self.volts_per_unit = _VOLTAGE_SCALE[c.get("voltage_unit", "uV")]
        self.allow_charging = bool(c.get("allow_charging", False))
        self.discharge_sign: int | None = None  # +1: positive current_now means discharging
        self.sign_source = ""
        self.chargers_online: list[str] = []
        self.unknown_online: list[str] = []
        self.charging_samples = 0
        self.samples = 0

    def _files(self) -> list[str]:
        return [f"{self.battery_dir}/current_now", f"{self.battery_dir}/voltage_now", f"{self.battery_dir}/status"]

    def _sample(self) -> tuple[float, float, str, float]:
        """(current in the file's sign, in A; voltage in V; status; host time) from one `adb shell cat`."""
        result, t = self._timed_shell(["cat", *self._files()])
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or len(lines) < 3:
            said = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise MeterUnavailable(f"android-battery: cannot read {self.battery_dir}/{{current_now,voltage_now,"
                                   f"status}} on {self.adb.serial}: {said} (set battery_dir in the [meter] table "
                                   "if the gauge lives elsewhere)")
        try:
            current, voltage = int(lines[0]), int(lines[1])
        except ValueError:
            raise MeterUnavailable(f"android-battery: current_now/voltage_now are not integers "
                                   f"({lines[0]!r}, {lines[1]!r})") from None
        return current * self.amps_per_unit, voltage * self.volts_per_unit, lines[2], t

    def _chargers(self) -> tuple[list[str], list[str]]:
        """Names of power supplies online that are chargers, and of those online whose type says nothing."""
        listing = self.adb.shell(["ls", self.supply_root], check=True).stdout.split()
        paths = [f"{self.supply_root}/{n}/{f}" for n in listing for f in ("type", "online")]
        values = self.adb.read_files(paths) if paths else {}
        chargers, unknown = [], []
        for name in listing:
            if (values.get(f"{self.supply_root}/{name}/online") or "").strip() != "1":
                continue
            kind = (values.get(f"{self.supply_root}/{name}/type") or "Unknown").strip()
            (unknown if kind in _NOT_CHARGERS else chargers).append(f"{name} ({kind})")
        return chargers, unknown

    def open(self) -> None:
        self.adb = self._connect()
        try:
            self.chargers_online, self.unknown_online = self._chargers()
        except DeviceGone as exc:
            raise MeterUnavailable(f"android-battery: {exc}") from None
        except AdbError as exc:
            raise MeterUnavailable(f"android-battery: cannot list {self.supply_root}: {exc}") from None
        amps, volts, status, _ = self._sample()
        self._sample()  # a second round trip, so interval_s already reflects the adb latency
        charging = status == "Charging" or bool(self.chargers_online)
        if charging and not self.allow_charging:
            why = (f"status is {status}" if status == "Charging"
                   else f"charger online: {', '.join(self.chargers_online)}")
            raise MeterUnavailable(
                f"android-battery: the battery is not the only supply ({why}), so its current is not the device's "
                "draw: measure over wireless debugging (`adb tcpip 5555; adb connect IP:5555`) with the cable out, "
                "use a hub that cuts USB power, or set allow_charging = true to record it anyway (flagged)")
        if not 2.5 <= volts <= 20:
            raise MeterUnavailable(f"android-battery: voltage_now reads {volts:g} V after scaling, not a battery "
                                   f"voltage: set voltage_unit (now {self.config.get('voltage_unit', 'uV')!r})")
        if abs(amps) * volts < 0.005:
            raise MeterUnavailable(f"android-battery: current_now gives {abs(amps) * volts * 1e3:.2f} mW for an awake "
                                   "device, implausibly low: set current_unit = \"mA\" if the gauge reports mA")
        if self.sign_mode == "auto":
            if status != "Discharging" or charging:
                raise MeterUnavailable(f"android-battery: current_sign = \"auto\" learns the sign from a discharging "
                                       f"battery, but the status is {status}: set current_sign in the [meter] table")
            self.discharge_sign = 1 if amps > 0 else -1
            self.sign_source = (f"auto: current_now was {'positive' if amps > 0 else 'negative'} while the status "
                                "said Discharging")
        else:
            self.discharge_sign = -1 if self.sign_mode == "discharge_negative" else 1
            self.sign_source = f"configured: {self.sign_mode}"

    def read(self) -> Reading:
        if self.adb is None:
            raise MeterUnavailable("android-battery: read() before open()")
        amps, volts, status, t = self._sample()
        discharge = self.discharge_sign * amps
        self.samples += 1
        if status == "Charging" or discharge < 0:
            self.charging_samples += 1
            if not self.allow_charging:
                raise MeterUnavailable(f"android-battery: the battery started charging during the run (status "
                                       f"{status}, current into the battery): a charger was connected")
        return Reading(t, watts=discharge * volts, parts={"battery": discharge * volts})

    def describe(self) -> dict:
        out = super().describe()
        out.update({
            "source": f"{self.battery_dir}/current_now and voltage_now over adb (one `adb shell cat` per sample)",
            "units": f"current_now in {self.config.get('current_unit', 'uA')}, voltage_now in "
                     f"{self.config.get('voltage_unit', 'uV')}; watts = discharge current x voltage",
            "current_sign": self.sign_source or self.sign_mode,
            "covers": "the whole device as drawn from the battery (SoC, memory, display, radios), while no charger "
                      "supplies it",
            "gauge_rate": "the fuel gauge updates at its own, device-specific rate; samples between updates repeat",
        })
        if self.allow_charging:
            out["allow_charging"] = True
            out["charging"] = {"chargers_online_at_open": self.chargers_online,
                               "samples_charging": self.charging_samples, "samples": self.samples,
                               "meaning": "while a charger is online the battery's power is the device's draw minus "
                                          "the charge power (negative when the battery charges): not the device's "
                                          "consumption"}
        if self.unknown_online:
            out["online_supplies_not_counted_as_chargers"] = self.unknown_online
        return out


def parse_odpm(text: str) -> tuple[int | None, dict[str, int]]:
    """(`t=` milliseconds since boot, {rail: cumulative µJ}) from one energy_value file."""
    stamp, rails = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("t="):
            stamp = int(line[2:])
            continue
        match = _ODPM_LINE.match(line)
        if match:
            rails[match.group(3)] = int(match.group(4))
    return stamp, rails


@register_meter("android-odpm")
class AndroidOdpmMeter(_AdbMeter):
    kind = "energy"

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        self.root = str(self.config.get("iio_root", "/sys/bus/iio/devices")).rstrip("/")
        self.wanted = list(self.config.get("rails", []))
        self.files: list[str] = []
        self.start: dict[str, int] = {}
        self.last: dict[str, int] = {}

    def _read_rails(self) -> tuple[dict[str, int], float]:
        result, t = self._timed_shell(["cat", *self.files])
        rails = parse_odpm(result.stdout)[1]  # every file's rail lines (rail names differ between the PMICs)
        if result.returncode != 0 or not rails:
            said = (result.stderr.strip().splitlines() or ["no rail lines"])[0]
            raise MeterUnavailable(f"android-odpm: cannot read {', '.join(self.files)}: {said} (reading ODPM "
                                   "usually needs root: `adb root` on a userdebug build)")
        return rails, t

    def open(self) -> None:
        self.adb = self._connect()
        try:
            self.files = self.adb.glob(f"{self.root}/iio:device*/energy_value")
        except AdbError as exc:
            raise MeterUnavailable(f"android-odpm: {exc}") from None
        if not self.files:
            raise MeterUnavailable(f"android-odpm: no ODPM rails on {self.adb.serial} (no {self.root}/iio:device*/"
                                   "energy_value; Pixel 6 and later have them)")
        rails, _ = self._read_rails()
        missing = [r for r in self.wanted if r not in rails]
        if missing:
            raise MeterUnavailable(f"android-odpm: rails {', '.join(missing)} not found; this device has "
                                   f"{', '.join(sorted(rails))}")
        self.start = self.last = {r: v for r, v in rails.items() if not self.wanted or r in self.wanted}
        self._read_rails()  # a second round trip, so interval_s already reflects the adb latency

    def read(self) -> Reading:
        if not self.files:
            raise MeterUnavailable("android-odpm: read() before open()")
        rails, t = self._read_rails()
        parts = {}
        for rail, first in self.start.items():
            if rail not in rails:
                raise MeterUnavailable(f"android-odpm: rail {rail} disappeared")
            if rails[rail] < self.last[rail]:
                raise MeterUnavailable(f"android-odpm: rail {rail}'s counter went backwards (ODPM reset)")
            parts[rail] = (rails[rail] - first) * 1e-6
        self.last = {r: rails[r] for r in self.start}
        return Reading(t, joules=sum(parts.values()), parts=parts)

    def describe(self) -> dict:
        out = super().describe()
        out.update({"source": self.files, "units": "microwatt-seconds (µJ), cumulative per rail",
                    "rails": sorted(self.start),
                    "covers": "the sum of these ODPM rails (SoC, memory and some radio rails): not the display or "
                              "the whole device"})
        return out
