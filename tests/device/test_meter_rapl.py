"""The `rapl` meter on fake powercap trees built in tmp_path, and on this machine's real /sys/class/powercap."""

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import record_window

from hpqdeploy.device.meters import rapl
from hpqdeploy.device.meters.base import MeterUnavailable, get_meter
from hpqdeploy.device.meters.recorder import PowerRecorder
from hpqdeploy.device.profiles import load_profile
from hpqdeploy.errors import UserError

BIG = 262_143_328_850  # a typical max_energy_range_uj


def zone(root: Path, zone_id: str, name: str, energy_uj: int, max_uj: int = BIG) -> Path:
    path = root / f"intel-rapl:{zone_id}"
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def set_uj(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def two_sockets(tmp_path) -> dict[str, Path]:
    """Two packages, each with core and dram subzones, and a psys zone, as on a two-socket Intel server."""
    root = tmp_path / "powercap"
    root.mkdir()
    (root / "intel-rapl").mkdir()  # the control-type directory, not a zone
    zones = {
        "package-0": zone(root, "0", "package-0", 1_000_000),
        "package-0/core": zone(root, "0:0", "core", 500_000),
        "package-0/dram": zone(root, "0:1", "dram", 200_000),
        "package-1": zone(root, "1", "package-1", 3_000_000),
        "package-1/dram": zone(root, "1:0", "dram", 400_000),
        "psys": zone(root, "2", "psys", 9_000_000),
    }
    zone(root.parent / "elsewhere", "0", "package-0", 0)  # not under root: must be ignored
    mmio = root / "intel-rapl-mmio:0"  # duplicates package-0 on some Intel CPUs: must not be counted
    mmio.mkdir()
    (mmio / "name").write_text("package-0\n")
    (mmio / "energy_uj").write_text("123\n")
    return zones


def opened(root: Path, **config) -> rapl.RaplMeter:
    meter = get_meter("rapl", {"root": str(root), **config})
    meter.open()
    return meter


def test_total_is_package_plus_dram_and_psys_is_reported_apart(two_sockets):
    root = two_sockets["psys"].parent
    meter = opened(root)
    assert isinstance(meter, rapl.RaplMeter)
    steps = {"package-0": 3_000_000, "package-0/core": 1_000_000, "package-0/dram": 250_000,
             "package-1": 2_000_000, "package-1/dram": 750_000, "psys": 20_000_000}
    for label, step in steps.items():
        set_uj(two_sockets[label], int((two_sockets[label] / "energy_uj").read_text()) + step)

    reading = meter.read()

    assert reading.joules == 3.0 + 0.25 + 2.0 + 0.75  # packages and drams only: no core, no psys
    assert reading.parts == {label: step / 1e6 for label, step in steps.items()}
    assert reading.watts is None


def test_domains_choose_what_the_total_covers(two_sockets):
    root = two_sockets["psys"].parent
    meter = opened(root, domains=["package"])
    set_uj(two_sockets["package-0"], 1_500_000)
    set_uj(two_sockets["package-0/dram"], 900_000)

    assert meter.read().joules == 0.5
    assert meter.describe()["total_covers"] == ["package-0", "package-1"]


def test_counter_wrap_keeps_energy_growing_exactly(tmp_path):
    pkg = zone(tmp_path, "0", "package-0", 900_000, max_uj=1_000_000)
    meter = opened(tmp_path)
    totals = []
    for raw in (100_000, 600_000, 50_000, 950_000, 10_000):  # wraps at the 1st, 3rd and 5th step
        set_uj(pkg, raw)
        totals.append(meter.read().joules)

    assert totals == [0.2, 0.7, 1.15, 2.05, 2.11]
    assert totals == sorted(totals)


def test_counter_going_backwards_without_a_range_is_unavailable(tmp_path):
    pkg = zone(tmp_path, "0", "package-0", 900_000, max_uj=0)
    meter = opened(tmp_path)
    set_uj(pkg, 100_000)
    with pytest.raises(MeterUnavailable, match="went backwards"):
        meter.read()


def test_amd_without_dram_totals_the_package_and_says_dram_is_missing(tmp_path):
    pkg = zone(tmp_path, "0", "package-0", 0)
    zone(tmp_path, "0:0", "core", 0)
    meter = opened(tmp_path)
    set_uj(pkg, 4_000_000)

    assert meter.read().joules == 4.0
    info = meter.describe()
    assert info["total_covers"] == ["package-0"]
    assert info["missing_domains"] == ["dram"]


def test_describe_records_zones_units_and_ranges(two_sockets):
    root = two_sockets["psys"].parent
    info = opened(root).describe()

    assert info["meter"] == "rapl" and info["kind"] == "energy" and info["root"] == str(root)
    assert "microjoules" in info["units"]
    by_label = {z["label"]: z for z in info["zones"]}
    assert sorted(by_label) == sorted(two_sockets)  # the mmio duplicate and the control-type dir are not zones
    assert by_label["psys"]["in_total"] is False
    assert by_label["package-0/core"]["in_total"] is False
    assert by_label["package-1/dram"] == {"label": "package-1/dram", "path": str(two_sockets["package-1/dram"]),
                                          "domain": "dram", "in_total": True, "max_energy_range_uj": BIG}


def test_describe_after_close_still_names_the_zones(tmp_path):
    """`profile` closes the meter before it writes the result, so describe() must not forget what was measured."""
    zone(tmp_path, "0", "package-0", 0)
    meter = opened(tmp_path)
    meter.close()
    assert meter.describe()["total_covers"] == ["package-0"]
    with pytest.raises(MeterUnavailable, match="after close"):
        meter.read()


def test_no_powercap_directory(tmp_path):
    meter = get_meter("rapl", {"root": str(tmp_path / "missing")})
    with pytest.raises(MeterUnavailable, match=r"^power: no meter found: no RAPL zone under .*missing"):
        meter.open()


def test_powercap_without_rapl_zones(tmp_path):
    (tmp_path / "intel-rapl").mkdir()
    (tmp_path / "dtpm").mkdir()
    with pytest.raises(MeterUnavailable, match="no RAPL zone under .*intel_rapl_msr"):
        get_meter("rapl", {"root": str(tmp_path)}).open()


def test_only_psys_is_not_a_board_total(tmp_path):
    zone(tmp_path, "0", "psys", 0)
    with pytest.raises(MeterUnavailable, match=r"no RAPL zone of domains \['package', 'dram'\].*found: psys"):
        get_meter("rapl", {"root": str(tmp_path)}).open()


def test_unreadable_energy_file_names_the_fix(tmp_path, monkeypatch):
    """Tests may run as root, which reads a mode-000 file anyway, so the kernel's refusal is simulated here."""
    zone(tmp_path, "0", "package-0", 0)
    real_read_text = Path.read_text

    def root_only(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", root_only)
    with pytest.raises(MeterUnavailable) as info:
        get_meter("rapl", {"root": str(tmp_path)}).open()
    message = str(info.value)
    assert "intel-rapl:0/energy_uj" in message
    assert "root only since Linux 5.10 (CVE-2020-8694): run as root or chmod" in message
    assert "\n" not in message


def test_mode_000_energy_file(tmp_path):
    """The same refusal from the file system itself; root ignores mode bits, so this needs an unprivileged user."""
    pkg = zone(tmp_path, "0", "package-0", 0)
    (pkg / "energy_uj").chmod(0)
    if os.access(pkg / "energy_uj", os.R_OK):
        pytest.skip("running as root: mode 000 does not stop reads (covered by the simulated test above)")
    with pytest.raises(MeterUnavailable, match="CVE-2020-8694"):
        get_meter("rapl", {"root": str(tmp_path)}).open()


def test_garbage_in_energy_file(tmp_path):
    """A path that cannot be read as a number (a directory here) is a reason, not a traceback."""
    pkg = zone(tmp_path, "0", "package-0", 0)
    (pkg / "energy_uj").unlink()
    (pkg / "energy_uj").mkdir()
    with pytest.raises(MeterUnavailable, match="cannot read .*energy_uj: IsADirectoryError"):
        get_meter("rapl", {"root": str(tmp_path)}).open()


def test_zone_vanishing_mid_run(two_sockets):
    meter = opened(two_sockets["psys"].parent)
    meter.read()
    shutil.rmtree(two_sockets["package-1/dram"])
    with pytest.raises(MeterUnavailable, match="RAPL zone package-1/dram vanished"):
        meter.read()


def test_read_before_open(tmp_path):
    zone(tmp_path, "0", "package-0", 0)
    with pytest.raises(MeterUnavailable, match="before open"):
        get_meter("rapl", {"root": str(tmp_path)}).read()


def test_reading_time_is_monotonic_now(tmp_path):
    zone(tmp_path, "0", "package-0", 0)
    meter = opened(tmp_path)
    before = time.monotonic()
    reading = meter.read()
    assert before <= reading.t <= time.monotonic()


@pytest.mark.parametrize("domains, why", [(["package", "core"], "count energy twice"),
                                          (["psys"], "psys is always reported apart"),
                                          (["gpu"], "cannot form the board total")])
def test_domains_that_would_miscount_are_refused(tmp_path, domains, why):
    with pytest.raises(UserError, match=why):
        get_meter("rapl", {"root": str(tmp_path), "domains": domains})


def linear_counters(monkeypatch, watts: dict[str, float], t_base: float) -> None:
    """Make each zone's energy_uj the integral of a constant power since t_base, wrapped at its range."""
    real = rapl._read_int

    def fake(path: Path) -> int:
        if path.name != "energy_uj":
            return real(path)
        max_uj = real(path.parent / "max_energy_range_uj")
        name = (path.parent / "name").read_text().strip()
        return int(watts[name] * (time.monotonic() - t_base) * 1e6) % max_uj

    monkeypatch.setattr(rapl, "_read_int", fake)


def test_recorder_integrates_the_window_across_wraps(tmp_path, monkeypatch):
    # package 20 W and dram 5 W each wrap every 0.2 s, once or more during the run; psys 40 W stays out of the total.
    zone(tmp_path, "0", "package-0", 0, max_uj=4_000_000)
    zone(tmp_path, "0:0", "dram", 0, max_uj=1_000_000)
    zone(tmp_path, "1", "psys", 0)
    linear_counters(monkeypatch, {"package-0": 20.0, "dram": 5.0, "psys": 40.0}, time.monotonic())
    meter = opened(tmp_path, interval_ms=10)

    rec, t0, t1 = record_window(meter, 0.2)
    window = rec.window(t0, t1)

    assert window.seconds == pytest.approx(t1 - t0)
    assert window.joules == pytest.approx(25.0 * (t1 - t0), rel=0.02)
    assert window.mean_watts == pytest.approx(25.0, rel=0.02)
    assert window.samples >= 5
    assert "cumulative" in window.method


def test_recorder_reports_a_zone_vanishing_during_the_window(tmp_path):
    pkg = zone(tmp_path, "0", "package-0", 0)
    meter = opened(tmp_path, interval_ms=10)
    with PowerRecorder(meter) as rec:
        t0 = time.monotonic()
        time.sleep(0.03)
        shutil.rmtree(pkg)
        time.sleep(0.05)
        t1 = time.monotonic()
    assert rec.error is not None
    with pytest.raises(MeterUnavailable, match="meter stopped during the run: .*package-0 vanished"):
        rec.window(t0, t1)


def test_this_machine_says_why_it_has_no_rapl():
    meter = get_meter("rapl", load_profile("x86").meter_config)
    if Path("/sys/class/powercap").exists():
        pytest.skip("this machine has a powercap directory; the assertion below is for machines without one")
    with pytest.raises(MeterUnavailable) as info:
        meter.open()
    assert str(info.value).startswith("power: no meter found: no RAPL zone under /sys/class/powercap")
    assert meter.describe()["zones"] == []  # nothing measured, so nothing to report as a number
