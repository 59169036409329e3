"""What a power meter is: something that reads either a cumulative energy counter or an instantaneous power.

Two kinds, because devices expose two kinds:
- `energy` meters (RAPL powercap, NVML total energy) return joules accumulated since `open()`; the meter itself
  handles counter wrap-around, so readings only grow;
- `power` meters (INA3221 rails in hwmon, tegrastats, an Android battery over adb) return watts at the moment of
  the reading; the recorder integrates them over time.

A meter that cannot be used raises `MeterUnavailable` with the reason a person needs ("no powercap zone under
/sys/class/powercap", "energy_uj is root-only (since Linux 5.10): run as root or chmod it"). That reason ends up in
the result instead of a number: nothing is ever estimated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal


from hpqdeploy.registry import Registry


class MeterUnavailable(Exception):
    """No meter, no permission, no device: the message is the reason shown in the result."""


@dataclass
class Reading:
    t: float  # time.monotonic() of the reading, seconds
    joules: float | None = None  # energy meters: total since open(), wrap-corrected
    watts: float | None = None  # power meters: board total at `t`
    parts: dict[str, float] = field(default_factory=dict)  # per domain/rail: joules (energy) or watts (power)


class PowerMeter(ABC):
    name: str
    kind: Literal["energy", "power"]

    def __init__(self, config: dict | None = None):
        self.config = dict(config or {})

    @property
    def interval_s(self) -> float:
        """How often the meter updates: the recorder samples at this period (profiles may override it)."""
        return float(self.config.get("interval_ms", 100)) / 1000

    @abstractmethod
    def open(self) -> None:
        """Find the meter and take a first reading; raise MeterUnavailable(reason) if it cannot be used."""

    @abstractmethod
    def read(self) -> Reading:
        """One reading; raise MeterUnavailable if the meter vanished (device unplugged, file gone)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def describe(self) -> dict:
        """Where the meter lives, its units and what the total covers (recorded with the result)."""
        return {"meter": self.name, "kind": self.kind, "interval_ms": round(self.interval_s * 1000, 3)}


METERS: Registry[type[PowerMeter]] = Registry("power meter", "hpqdeploy.device.meters", skip=("base", "recorder"))
register_meter = METERS.register
meter_names = METERS.names


def get_meter(name: str, config: dict | None = None) -> PowerMeter:
    return METERS.get(name, config)
