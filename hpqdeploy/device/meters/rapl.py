"""CPU package and DRAM energy from Linux powercap RAPL (Intel, and AMD through the same `intel-rapl` names).

Zones are `<root>/intel-rapl:N` (name `package-N`, or `psys` for the platform) with subzones `intel-rapl:N:M`
(`core`, `uncore`, `dram`). Each has a cumulative `energy_uj` that wraps at `max_energy_range_uj`. The board total
sums the configured domains only: `core` and `uncore` are parts of `package`, and `psys` covers the whole platform,
so adding any of them to `package` would count the same joules twice. `intel-rapl-mmio:*` duplicates the package
zone and is left out for the same reason.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading, register_meter
from hpqdeploy.errors import UserError

DEFAULT_ROOT = "/sys/class/powercap"
DEFAULT_DOMAINS = ("package", "dram")
TOTAL_DOMAINS = {"package", "core", "uncore", "dram"}  # psys is never part of the total
INSIDE_PACKAGE = {"core", "uncore"}
ZONE_DIR = re.compile(r"intel-rapl(:\d+)+")
PERMISSION_FIX = ("energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694): run as root or "
                  "chmod a+r {root}/intel-rapl:*/energy_uj (a udev rule makes it last across reboots)")


@dataclass
class Zone:
    label: str  # "package-0", "package-0/dram", "psys": unique, used as the part's name
    domain: str  # "package", "dram", "core", "uncore", "psys"
    path: Path
    max_range_uj: int
    last_uj: int = 0
    total_uj: int = 0  # wrap-corrected microjoules since open()


def _domain(name: str) -> str:
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


@register_meter("rapl")
class RaplMeter(PowerMeter):
    kind = "energy"

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        self.root = Path(self.config.get("root", DEFAULT_ROOT))
        self.domains = tuple(self.config.get("domains", DEFAULT_DOMAINS))
        self.zones: list[Zone] = []  # kept after close(): describe() runs once the measurement is over
        self._is_open = False
        self._check_domains()

    def _check_domains(self) -> None:
        unknown = [d for d in self.domains if d not in TOTAL_DOMAINS]
        if unknown:
            raise UserError(f"rapl meter: domains {unknown} cannot form the board total; choose from "
                            f"{sorted(TOTAL_DOMAINS)} (psys is always reported apart, never summed)")
        if "package" in self.domains and INSIDE_PACKAGE & set(self.domains):
            raise UserError(f"rapl meter: domains {list(self.domains)} count energy twice: core and uncore are "
                            f"parts of package; keep package, or list core/uncore without it")

    def _find_zones(self) -> list[Zone]:
        if not self.root.is_dir():
            raise MeterUnavailable(f"power: no meter found: no RAPL zone under {self.root} (the directory does not "
                                   f"exist: no powercap on this kernel, VM or container, or the CPU has no RAPL)")
        zones: list[Zone] = []
        labels: dict[str, str] = {}  # zone directory name -> label, so subzones can name their package
        found = [p for p in self.root.iterdir() if ZONE_DIR.fullmatch(p.name)]
        # Parents sort before their subzones: [0] < [0, 0] < [1].
        for path in sorted(found, key=lambda p: [int(x) for x in p.name.split(":")[1:]]):
            try:
                name = (path / "name").read_text().strip()
                max_range = _read_int(path / "max_energy_range_uj")
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"power: cannot read RAPL zone {path}: {exc.__class__.__name__}: "
                                       f"{exc}") from None
            parent = path.name.rpartition(":")[0]
            label = f"{labels[parent]}/{name}" if parent in labels else name
            labels[path.name] = label
            zones.append(Zone(label, _domain(name), path, max_range))
        if not zones:
            raise MeterUnavailable(f"power: no meter found: no RAPL zone under {self.root} (no intel-rapl:* "
                                   f"directory: load the intel_rapl_msr module, or the CPU/VM does not expose RAPL)")
        if not any(z.domain in self.domains for z in zones):
            names = ", ".join(z.label for z in zones)
            raise MeterUnavailable(f"power: no meter found: no RAPL zone of domains {list(self.domains)} under "
                                   f"{self.root} (found: {names}); set [meter] domains in the device profile")
        return zones

    def _counter(self, zone: Zone) -> int:
        path = zone.path / "energy_uj"
        try:
            return _read_int(path)
        except PermissionError:
            raise MeterUnavailable(f"power: cannot read {path}: {PERMISSION_FIX.format(root=self.root)}") from None
        except FileNotFoundError:
            raise MeterUnavailable(f"power: RAPL zone {zone.label} vanished ({path} is gone: was the intel_rapl "
                                   f"module unloaded or the CPU taken offline?)") from None
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"power: cannot read {path}: {exc.__class__.__name__}: {exc}") from None

    def open(self) -> None:
        zones = self._find_zones()
        for zone in zones:
            zone.last_uj = self._counter(zone)
        self.zones, self._is_open = zones, True

    def read(self) -> Reading:
        if not self._is_open:
            raise MeterUnavailable("power: the rapl meter was read before open() or after close()")
        start = time.monotonic()
        for zone in self.zones:
            raw = self._counter(zone)
            delta = raw - zone.last_uj
            if delta < 0:  # the counter wrapped (at most once: the interval is far shorter than a wrap)
                if zone.max_range_uj <= 0:
                    raise MeterUnavailable(f"power: RAPL zone {zone.label}'s counter went backwards and its "
                                           f"max_energy_range_uj is {zone.max_range_uj}: cannot correct the wrap")
                delta += zone.max_range_uj
            zone.last_uj = raw
            zone.total_uj += delta
        t = (start + time.monotonic()) / 2  # the counters were read across this span
        total_uj = sum(z.total_uj for z in self.zones if z.domain in self.domains)
        return Reading(t=t, joules=total_uj / 1e6, parts={z.label: z.total_uj / 1e6 for z in self.zones})

    def close(self) -> None:
        self._is_open = False

    def describe(self) -> dict:
        present = {z.domain for z in self.zones}
        return {
            **super().describe(),
            "root": str(self.root),
            "domains": list(self.domains),
            "total_covers": [z.label for z in self.zones if z.domain in self.domains],
            "missing_domains": [d for d in self.domains if self.zones and d not in present],
            "units": "energy_uj: cumulative microjoules, wrap-corrected by adding max_energy_range_uj; "
                     "reported in joules since open()",
            "zones": [{"label": z.label, "path": str(z.path), "domain": z.domain,
                       "in_total": z.domain in self.domains, "max_energy_range_uj": z.max_range_uj}
                      for z in self.zones],
        }
