"""Jetson power meters on fake sysfs trees and a fake tegrastats: rails per module, totals, and every way to fail."""

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import TESTS, install_fake_executable, record_window

from hpqdeploy.device.meters import ina3221
from hpqdeploy.device.meters.base import MeterUnavailable, get_meter
from hpqdeploy.device.meters.recorder import PowerRecorder
from hpqdeploy.device.meters.tegrastats import parse_line
from hpqdeploy.device.profiles import load_profile

DATA = TESTS / "data" / "jetson"

# Rails per module as the Linux device trees label them (tegra234-p3767, tegra234-p3701, tegra194-p3668):
# channel -> (label, bus mV, mA)
ORIN_NANO = {"1-0040": {1: ("VDD_IN", 5064, 1240), 2: ("VDD_CPU_GPU_CV", 5056, 412), 3: ("VDD_SOC", 5056, 268)}}
AGX_ORIN = {
    "1-0040": {1: ("VDD_GPU_SOC", 19152, 820), 2: ("VDD_CPU_CV", 19152, 142), 3: ("VIN_SYS_5V0", 4968, 1003)},
    "1-0041": {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 4976, 221)},
}
XAVIER_NX = {"7-0040": {1: ("VDD_IN", 5032, 905), 2: ("VDD_CPU_GPU_CV", 5024, 110), 3: ("VDD_SOC", 5024, 276)}}


def ina_tree(root: Path, devices: dict) -> Path:
    """/sys/bus/i2c/drivers/ina3221 as the mainline hwmon driver lays it out, with the shunt-sum channel in7."""
    for n, (device, channels) in enumerate(devices.items()):
        hwmon = root / device / "hwmon" / f"hwmon{n + 1}"
        hwmon.mkdir(parents=True)
        (hwmon / "name").write_text("ina3221\n")
        (hwmon / "update_interval").write_text("5\n")
        for ch, (label, mv, ma) in channels.items():
            (hwmon / f"in{ch}_label").write_text(label + "\n")
            (hwmon / f"in{ch}_input").write_text(f"{mv}\n")
            (hwmon / f"curr{ch}_input").write_text(f"{ma}\n")
            (hwmon / f"in{ch + 3}_input").write_text("2480\n")  # shunt voltage, uV
        (hwmon / "in7_label").write_text("sum of shunt voltages\n")
        (hwmon / "in7_input").write_text("4960\n")
    return root


def path_of(root: Path, device: str, name: str) -> Path:
    return next((root / device / "hwmon").glob(f"hwmon*/{name}"))


def watts(devices: dict, device: str, ch: int) -> float:
    _, mv, ma = devices[device][ch]
    return mv * ma / 1e6


def open_ina(root: Path, **config):
    meter = get_meter("ina3221", {"root": str(root), **config})
    meter.open()
    return meter


# ---------------------------------------------------------------------------------------------------------------
# ina3221


def test_orin_nano_total_is_vdd_in_and_every_rail_is_a_part(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root, total_rails=["VDD_IN"])
    reading = meter.read()
    assert reading.watts == pytest.approx(watts(ORIN_NANO, "1-0040", 1))
    assert reading.parts == pytest.approx({"VDD_IN": 5064 * 1240 / 1e6, "VDD_CPU_GPU_CV": 5056 * 412 / 1e6,
                                           "VDD_SOC": 5056 * 268 / 1e6})
    assert "sum of shunt voltages" not in reading.parts  # in7 has no current of its own
    info = meter.describe()
    assert info["total_rails"] == ["VDD_IN"] and info["rails"]["VDD_SOC"] == "1-0040/hwmon1 channel 3"
    assert info["update_interval_ms"] == {"1-0040/hwmon1": 5}


def test_agx_orin_total_is_three_rails_and_dram_is_reported_apart(tmp_path):
    root = ina_tree(tmp_path / "ina3221", AGX_ORIN)
    meter = open_ina(root, total_rails=["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"])
    reading = meter.read()
    expected = sum(watts(AGX_ORIN, "1-0040", ch) for ch in (1, 2, 3))
    assert reading.watts == pytest.approx(expected)
    assert reading.parts["VDDQ_VDD2_1V8AO"] == pytest.approx(watts(AGX_ORIN, "1-0041", 2))
    assert "NC" not in reading.parts
    assert any("not connected" in s for s in meter.describe()["skipped_channels"])


def test_readings_follow_the_files(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root)  # no total_rails: VDD_IN
    path_of(root, "1-0040", "curr1_input").write_text("2000\n")
    assert meter.read().watts == pytest.approx(5064 * 2000 / 1e6)


def test_no_default_total_without_vdd_in(tmp_path):
    root = ina_tree(tmp_path / "ina3221", AGX_ORIN)
    with pytest.raises(MeterUnavailable, match=r"set total_rails .*VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0"):
        open_ina(root)


def test_missing_driver_directory(tmp_path):
    with pytest.raises(MeterUnavailable, match=r"^power: no INA3221 found under .*nothing-here"):
        open_ina(tmp_path / "nothing-here")


def test_driver_directory_without_channels(tmp_path):
    (tmp_path / "ina3221" / "1-0040").mkdir(parents=True)
    with pytest.raises(MeterUnavailable, match="no INA3221 found under"):
        open_ina(tmp_path / "ina3221")


def test_missing_total_rail_names_the_rail_and_what_exists(tmp_path):
    root = ina_tree(tmp_path / "ina3221", AGX_ORIN)
    with pytest.raises(MeterUnavailable) as err:
        open_ina(root, total_rails=["VDD_IN"])
    message = str(err.value)
    assert "VDD_IN named in total_rails" in message and "VIN_SYS_5V0" in message and "\n" not in message


def test_total_rails_must_be_a_list(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    with pytest.raises(MeterUnavailable, match="non-empty list"):
        open_ina(root, total_rails="VDD_IN")


def test_file_vanishing_mid_run(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root)
    path_of(root, "1-0040", "curr1_input").unlink()
    with pytest.raises(MeterUnavailable, match="vanished"):
        meter.read()


def test_device_vanishing_during_a_recording(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root, interval_ms=10)
    with PowerRecorder(meter) as rec:
        t0 = time.monotonic()
        time.sleep(0.05)
        for f in (root / "1-0040" / "hwmon" / "hwmon1").iterdir():  # the driver unbinds: the whole directory goes
            f.unlink()
        time.sleep(0.05)
        t1 = time.monotonic()
    assert rec.error and "vanished" in rec.error
    with pytest.raises(MeterUnavailable, match="meter stopped during the run"):
        rec.window(t0, t1)


def fail_reading(monkeypatch, failing: Path, error: OSError) -> None:
    """Reading `failing` raises `error` (with the path as its filename); every other file reads as it is."""
    real = ina3221._read_text

    def read(path):
        if Path(path) == failing:
            raise type(error)(error.errno, error.strerror, str(path))
        return real(path)

    monkeypatch.setattr(ina3221, "_read_text", read)


def test_recorder_integrates_ina3221_power(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root, interval_ms=20)
    rec, t0, t1 = record_window(meter, 0.15)
    energy = rec.window(t0, t1)
    assert energy.joules == pytest.approx(watts(ORIN_NANO, "1-0040", 1) * (t1 - t0), rel=1e-9)
    assert energy.samples >= 3


def test_permission_denied_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    fail_reading(monkeypatch, path_of(root, "1-0040", "curr2_input"),
                 PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(MeterUnavailable, match=r"cannot read .*curr2_input: permission denied"):
        open_ina(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (the monkeypatched test covers it)")
def test_unreadable_file_mode(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root)
    path_of(root, "1-0040", "in1_input").chmod(0)
    with pytest.raises(MeterUnavailable, match="permission denied"):
        meter.read()


def test_disabled_channel_is_skipped(tmp_path, monkeypatch):
    devices = {**AGX_ORIN, "1-0041": {**AGX_ORIN["1-0041"], 3: ("VDD_SPARE", 0, 0)}}
    root = ina_tree(tmp_path / "ina3221", devices)
    fail_reading(monkeypatch, path_of(root, "1-0041", "in3_input"), OSError(errno.ENODATA, "No data available"))
    meter = open_ina(root, total_rails=["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"])
    assert "VDD_SPARE" not in meter.read().parts
    assert any("VDD_SPARE" in s and "disabled" in s for s in meter.describe()["skipped_channels"])


def test_garbage_in_a_file(tmp_path):
    root = ina_tree(tmp_path / "ina3221", ORIN_NANO)
    meter = open_ina(root)
    path_of(root, "1-0040", "in1_input").write_text("")
    with pytest.raises(MeterUnavailable, match="not a number"):
        meter.read()


@pytest.mark.parametrize("profile, devices, total", [
    ("jetson-orin-nano", ORIN_NANO, ["VDD_IN"]),
    ("jetson-orin-nx", ORIN_NANO, ["VDD_IN"]),
    ("jetson-agx-orin", AGX_ORIN, ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]),
    ("jetson-xavier-nx", XAVIER_NX, ["VDD_IN"]),
])
def test_profiles_name_the_module_rails(tmp_path, profile, devices, total):
    prof = load_profile(profile)
    assert prof.transport == "local" and prof.meter == "ina3221"
    assert prof.runners == ("tensorrt", "trtexec", "onnxruntime")
    assert prof.meter_config["total_rails"] == total
    assert prof.meter_config["root"] == ina3221.DEFAULT_ROOT
    root = ina_tree(tmp_path / "ina3221", devices)
    meter = get_meter(prof.meter, {**prof.meter_config, "root": str(root)})
    meter.open()
    expected = sum(mv * ma / 1e6 for chans in devices.values() for label, mv, ma in chans.values() if label in total)
    assert meter.read().watts == pytest.approx(expected)
    alternative = prof.extra["meter_alternatives"]["tegrastats"]
    assert alternative["name"] == "tegrastats" and alternative["total_rails"] == total
    assert prof.pin_clocks[-1] == ("jetson_clocks",)
    assert prof.state_commands["nvpmodel"] == ("nvpmodel", "-q")
    assert prof.state_commands["jetson_clocks"] == ("jetson_clocks", "--show")
    assert any("devfreq" in p for p in prof.state_files.values())


# ---------------------------------------------------------------------------------------------------------------
# tegrastats: parsing recorded lines


def first_line(name: str) -> str:
    return (DATA / name).read_text().splitlines()[0]


@pytest.mark.parametrize("fixture, rails, ram", [
    ("tegrastats_orin_nano_jp6.txt", {"VDD_IN": 4555, "VDD_CPU_GPU_CV": 480, "VDD_SOC": 1361}, (2183, 7620)),
    ("tegrastats_agx_orin_jp6.txt", {"VDD_GPU_SOC": 3150, "VDD_CPU_CV": 1181, "VIN_SYS_5V0": 4968,
                                     "VDDQ_VDD2_1V8AO": 1091}, (5874, 62841)),
    ("tegrastats_xavier_nx_jp5.txt", {"VDD_IN": 4543, "VDD_CPU_GPU_CV": 551, "VDD_SOC": 1389}, (2180, 7765)),
    ("tegrastats_xavier_nx_jp4.txt", {"VDD_IN": 3920, "VDD_CPU_GPU_CV": 538, "VDD_SOC": 1197}, (1985, 7765)),
    ("tegrastats_nano_jp4.txt", {"POM_5V_IN": 2011, "POM_5V_GPU": 0, "POM_5V_CPU": 394}, (1985, 3964)),
])
def test_parse_recorded_lines(fixture, rails, ram):
    parsed = parse_line(first_line(fixture))
    assert parsed.rails_mw == rails  # current values only; RAM/SWAP/IRAM, temperatures and clocks are not rails
    assert (parsed.ram_used_mb, parsed.ram_total_mb) == ram


def test_parse_takes_the_current_not_the_average():
    parsed = parse_line("RAM 1/2MB VDD_IN 8864mW/6947mW VDD_SOC 2017mW/1730mW SWAP 0/3810MB IRAM 0/252kB")
    assert parsed.rails_mw == {"VDD_IN": 8864, "VDD_SOC": 2017}


def test_parse_line_without_rails():
    assert parse_line("tegrastats: permission denied").rails_mw == {}


# ---------------------------------------------------------------------------------------------------------------
# tegrastats: the meter against a fake binary


@pytest.fixture
def fake_tegrastats(tmp_path, monkeypatch):
    """`tegrastats` on PATH printing the recorded lines of `use(fixture)`; returns `use`."""
    bindir = tmp_path / "bin"
    install_fake_executable(bindir, "tegrastats", DATA / "fake_tegrastats.py")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("FAKE_TEGRASTATS_ARGS", str(tmp_path / "args.txt"))
    monkeypatch.delenv("FAKE_TEGRASTATS_EXIT_AFTER", raising=False)

    def use(fixture: str, exit_after: int = 0):
        monkeypatch.setenv("FAKE_TEGRASTATS_LINES", str(DATA / fixture))
        if exit_after:
            monkeypatch.setenv("FAKE_TEGRASTATS_EXIT_AFTER", str(exit_after))
        return tmp_path / "args.txt"

    return use


def open_tegrastats(**config):
    meter = get_meter("tegrastats", {"interval_ms": 20, **config})
    meter.open()
    return meter


def recorded_mw(fixture: str, rails: list[str]) -> list[float]:
    return [sum(parse_line(line).rails_mw[r] for r in rails) / 1000
            for line in (DATA / fixture).read_text().splitlines() if line.strip()]


def test_tegrastats_orin_nano(fake_tegrastats):
    args = fake_tegrastats("tegrastats_orin_nano_jp6.txt")
    meter = open_tegrastats(total_rails=["VDD_IN"])
    try:
        readings = [meter.read() for _ in range(3)]
    finally:
        meter.close()
    assert args.read_text().split() == ["--interval", "20"]  # an argument list, not a shell string
    expected = recorded_mw("tegrastats_orin_nano_jp6.txt", ["VDD_IN"])
    assert [meter.first.watts] + [r.watts for r in readings] == pytest.approx(expected[:4])
    assert all(r.parts["VDD_IN"] == r.watts for r in readings)
    assert [r.t for r in readings] == sorted(r.t for r in readings) and len({r.t for r in readings}) == 3
    assert meter.describe()["ram_used_peak_mb"] >= 2183


def test_tegrastats_runs_line_buffered_where_stdbuf_exists(fake_tegrastats, monkeypatch):
    stdbuf = shutil.which("stdbuf", path="/usr/bin:/bin")
    if stdbuf is None:
        pytest.skip("no stdbuf here")
    fake_tegrastats("tegrastats_orin_nano_jp6.txt")
    monkeypatch.setenv("PATH", os.environ["PATH"] + os.pathsep + str(Path(stdbuf).parent))
    meter = open_tegrastats()
    try:
        assert meter.command[:2] == [stdbuf, "-oL"] and meter.command[-2:] == ["--interval", "20"]
        assert meter.read().watts > 0
    finally:
        meter.close()


def test_tegrastats_agx_orin_sums_three_rails(fake_tegrastats):
    fake_tegrastats("tegrastats_agx_orin_jp6.txt")
    meter = open_tegrastats(total_rails=["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"])
    try:
        reading = meter.read()
    finally:
        meter.close()
    assert reading.watts == pytest.approx((12807 + 2364 + 5168) / 1000)
    assert reading.parts["VDDQ_VDD2_1V8AO"] == pytest.approx(1.892)


def test_tegrastats_old_format_defaults_to_pom_5v_in(fake_tegrastats):
    fake_tegrastats("tegrastats_nano_jp4.txt")
    meter = open_tegrastats()
    try:
        assert meter.total_rails == ["POM_5V_IN"]
        assert meter.read().watts == pytest.approx(5.847)
    finally:
        meter.close()


def test_tegrastats_missing_rail_stops_the_process(fake_tegrastats):
    fake_tegrastats("tegrastats_orin_nano_jp6.txt")
    meter = get_meter("tegrastats", {"interval_ms": 20, "total_rails": ["VIN_SYS_5V0"]})
    with pytest.raises(MeterUnavailable, match=r"VIN_SYS_5V0 named in total_rails .*found: VDD_IN"):
        meter.open()
    assert meter._proc.poll() is not None


def test_tegrastats_without_rails_times_out(fake_tegrastats, tmp_path, monkeypatch):
    fake_tegrastats("tegrastats_orin_nano_jp6.txt")
    junk = tmp_path / "junk.txt"
    junk.write_text("RAM 2183/7620MB (lfb 2x4MB) CPU [2%@729,1%@729] GR3D_FREQ 0%@[305] cpu@46.343C\n")
    monkeypatch.setenv("FAKE_TEGRASTATS_LINES", str(junk))
    meter = get_meter("tegrastats", {"interval_ms": 20, "first_line_timeout_s": 0.2})
    with pytest.raises(MeterUnavailable, match="printed no power rails for 0.2 s"):
        meter.open()
    assert meter._proc.poll() is not None  # not left running


def test_no_tegrastats_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MeterUnavailable, match="^power: no tegrastats binary on PATH"):
        open_tegrastats()


def test_tegrastats_dying_mid_run(fake_tegrastats):
    fake_tegrastats("tegrastats_orin_nano_jp6.txt", exit_after=3)
    meter = open_tegrastats()
    with pytest.raises(MeterUnavailable) as err:
        for _ in range(10):
            meter.read()
    meter.close()
    assert "exited with code 3" in str(err.value) and "No such device" in str(err.value)


def test_tegrastats_under_the_recorder(fake_tegrastats):
    fake_tegrastats("tegrastats_orin_nano_jp6.txt")
    meter = open_tegrastats(interval_ms=15)
    try:
        rec, t0, t1 = record_window(meter, 0.1, settle=0.02)
    finally:
        meter.close()
    energy = rec.window(t0, t1)  # the reading after the window waits for tegrastats' next line: the end is covered
    low, high = min(recorded_mw("tegrastats_orin_nano_jp6.txt", ["VDD_IN"])), 8.903
    assert low * (t1 - t0) <= energy.joules <= high * (t1 - t0)
