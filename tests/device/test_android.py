"""The Android side of `profile --device android`: adb client, executor_runner runner, battery and ODPM meters.

A fake `adb` (tests/fakes/adb) stands first on PATH and answers from a scenario; its answers are the outputs in
tests/data/android (see the README there for how each was made). Every call it receives is logged, so the tests
check what was sent to the device as well as what came back.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from hpqdeploy.device import adb as adbmod
from hpqdeploy.device.adb import Adb, AdbTimeout, AdbUnavailable, DeviceGone, device_state, parse_devices
from hpqdeploy.device.meters.android_battery import AndroidBatteryMeter, AndroidOdpmMeter, parse_odpm
from hpqdeploy.device.meters.base import MeterUnavailable, get_meter
from hpqdeploy.device.profiles import DeviceProfile, load_profile
from hpqdeploy.device.runners.android import AndroidExecuTorchRunner, parse_flags, parse_runner_output
from hpqdeploy.device.runners.base import RunnerUnavailable, RunSettings, get_runner
from conftest import TESTS

FAKE = TESTS / "fakes" / "adb"
DATA = TESTS / "data" / "android"
SERIAL = "R58M1234ABC"
WORK = "/data/local/tmp/hpqdeploy"
PS = "/sys/class/power_supply"
ODPM = [f"/sys/bus/iio/devices/iio:device{i}/energy_value" for i in (0, 1)]


class FakeAdb:
    """The fake adb on PATH, its scenario and its call log."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.root = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "adb"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.scenario = tmp_path / "scenario.json"
        self.log = tmp_path / "calls.jsonl"
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setenv("HPQ_FAKE_ADB_SCENARIO", str(self.scenario))
        monkeypatch.delenv("ANDROID_SERIAL", raising=False)
        self.set()

    def set(self, rules=(), devices=((SERIAL, "device"),), **extra) -> None:
        """A new scenario, with a fresh call log (so `outputs` sequences start again)."""
        self.log.unlink(missing_ok=True)
        self.scenario.write_text(json.dumps({"devices": [list(d) for d in devices], "rules": list(rules),
                                             "data_dir": str(DATA), "log": str(self.log), **extra}))

    def update(self, **extra) -> None:
        blob = json.loads(self.scenario.read_text())
        blob.update(extra)
        self.scenario.write_text(json.dumps(blob))

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines() if line.strip()]

    def shell_calls(self) -> list[list[str]]:
        """What the device shell would run, split as it splits it."""
        return [shlex.split(c[1]) for c in self.calls() if c[:1] == ["shell"]]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeAdb:
    return FakeAdb(tmp_path, monkeypatch)


def rule(match: str, **answer) -> dict:
    return {"match": match, **answer}


# -- adb: finding it, choosing the device ----------------------------------------------------------------------------

def test_adb_missing_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no adb anywhere
    with pytest.raises(AdbUnavailable) as info:
        Adb.connect({})
    message = str(info.value)
    assert "\n" not in message and "adb not found on PATH" in message
    assert "apt-get install adb" in message and "platform-tools" in message
    with pytest.raises(AdbUnavailable, match=r"adb not found at /nowhere/adb"):
        Adb.connect({"adb": "/nowhere/adb"})
    runner = get_runner("android-executorch", {"adb": {}})
    (tmp_path / "model_b1.pte").write_bytes(b"pte")
    with pytest.raises(RunnerUnavailable, match="apt-get install adb"):
        runner.prepare(tmp_path, None, RunSettings())
    with pytest.raises(MeterUnavailable, match="apt-get install adb"):
        get_meter("android-battery", {}).open()
    assert "apt-get install adb" in device_state(load_profile("android"))["error"]  # recorded, not raised


def test_parse_devices_skips_daemon_chatter():
    text = ("* daemon not running; starting now at tcp:5037\n* daemon started successfully\n"
            "List of devices attached\nemulator-5554\tdevice product:sdk model:sdk device:generic\n"
            "R58M1234ABC\tunauthorized usb:1-1\n"
            "0123456789ABCDEF\tno permissions (user in plugdev group; are your udev rules wrong?); see [x]\n\n")
    assert parse_devices(text) == [("emulator-5554", "device"), ("R58M1234ABC", "unauthorized"),
                                   ("0123456789ABCDEF", "no permissions")]
    with pytest.raises(AdbUnavailable,
                       match="0123456789ABCDEF has no permissions: the host user cannot open the USB device"):
        adbmod.choose_serial(parse_devices(text), "0123456789ABCDEF")


def test_one_device_is_chosen(fake):
    assert Adb.connect({}).serial == SERIAL


def test_no_device(fake):
    fake.set(devices=())
    with pytest.raises(AdbUnavailable, match="no Android device attached"):
        Adb.connect({})


def test_several_devices_need_a_serial(fake):
    fake.set(devices=((SERIAL, "device"), ("emulator-5554", "device")))
    with pytest.raises(AdbUnavailable, match=r"2 devices attached \(R58M1234ABC, emulator-5554\): choose one with "
                                             r"--serial"):
        Adb.connect({})
    assert Adb.connect({}, serial="emulator-5554").serial == "emulator-5554"
    assert Adb.connect({"serial": SERIAL}).serial == SERIAL


def test_android_serial_environment_is_honoured(fake, monkeypatch):
    fake.set(devices=((SERIAL, "device"), ("emulator-5554", "device")))
    monkeypatch.setenv("ANDROID_SERIAL", "emulator-5554")
    assert Adb.connect({}).serial == "emulator-5554"


def test_unauthorized_and_offline_devices_are_refused_with_the_fix(fake):
    fake.set(devices=((SERIAL, "unauthorized"),))
    with pytest.raises(AdbUnavailable, match=r"device R58M1234ABC is unauthorized: .*accept the 'Allow USB debugging'"):
        Adb.connect({})
    fake.set(devices=((SERIAL, "unauthorized"), ("emulator-5554", "offline")))
    with pytest.raises(AdbUnavailable, match=r"no attached device is usable: .*unauthorized.*emulator-5554 is offline"):
        Adb.connect({})
    with pytest.raises(AdbUnavailable, match="emulator-5554 is offline: re-plug"):
        Adb.connect({}, serial="emulator-5554")
    # one usable device among unusable ones is taken
    fake.set(devices=((SERIAL, "unauthorized"), ("emulator-5554", "device")))
    assert Adb.connect({}).serial == "emulator-5554"


def test_asked_serial_not_attached(fake):
    with pytest.raises(AdbUnavailable, match=r"device XYZ not found by adb \(attached: R58M1234ABC \(device\)\)"):
        Adb.connect({}, serial="XYZ")


# -- adb: commands ---------------------------------------------------------------------------------------------------

def test_shell_arguments_reach_the_device_shell_intact(fake):
    fake.set(rules=[rule(r"^shell echo", stdout="ok\n"), rule(r"^shell sh -c", stdout="looped\n")])
    adb = Adb.connect({})
    args = ["echo", "a b", "it's", "$HOME; rm -rf /", "*", ""]
    assert adb.shell(args).stdout == "ok\n"
    assert fake.shell_calls()[-1] == args
    assert fake.calls()[-1][0] == "shell" and len(fake.calls()[-1]) == 2  # one string, quoted for the device shell
    adb.script([["echo", "x y"], ["true"]], repeat=3)
    script = fake.shell_calls()[-1]
    assert script[:2] == ["sh", "-c"]
    assert script[2] == "i=0; while [ $i -lt 3 ]; do echo 'x y' && true || exit $?; i=$((i+1)); done"


def test_check_turns_a_failure_into_one_line(fake):
    fake.set(rules=[rule(r"^shell mkdir", stderr="mkdir: '/data/x': Permission denied\nmore\n", rc=1)])
    with pytest.raises(adbmod.AdbError, match=r"`mkdir -p /data/x` failed on R58M1234ABC \(exit 1\): mkdir: "
                                              r"'/data/x': Permission denied$"):
        Adb.connect({}).shell(["mkdir", "-p", "/data/x"], check=True)


def test_timeout(fake):
    fake.set(rules=[rule(r"^shell sleep", sleep=0.6)])
    adb = Adb.connect({})
    with pytest.raises(AdbTimeout, match="timed out after 0.2 s"):
        adb.shell(["sleep", "1"], timeout=0.2)


def test_push_and_read_files(fake, tmp_path):
    fake.set(rules=[rule(r"^shell grep -s -H '' ", stdout="/sys/bus/iio/devices/iio:device0/name:s2mpg10-odpm\n"
                                                          "/sys/x/multi:line one\n/sys/x/multi:line two\n")])
    adb = Adb.connect({})
    local = tmp_path / "model_b4.pte"
    local.write_bytes(b"\0" * 10)
    adb.push(local, f"{WORK}/model_b4.pte")
    assert ["push", str(local), f"{WORK}/model_b4.pte"] in fake.calls()
    with pytest.raises(adbmod.AdbError, match="cannot push .*missing.pte: no such file"):
        adb.push(tmp_path / "missing.pte", WORK)
    values = adb.read_files(["/sys/bus/iio/devices/iio:device0/name", "/sys/x/multi", "/sys/x/absent"])
    assert values == {"/sys/bus/iio/devices/iio:device0/name": "s2mpg10-odpm", "/sys/x/multi": "line one\nline two",
                      "/sys/x/absent": None}
    with pytest.raises(adbmod.AdbError, match="refusing device glob"):
        adb.glob("/sys/*; reboot")


def test_vanished_device_raises_device_gone(fake):
    adb = Adb.connect({})
    fake.update(fail_after=len(fake.calls()))
    with pytest.raises(DeviceGone, match=r"device R58M1234ABC went away during `cat /x`: adb said "
                                          r"'device 'R58M1234ABC' not found'"):
        adb.shell(["cat", "/x"])
    fake.update(gone_message="adb: device 'R58M1234ABC' not found")  # newer adb releases
    with pytest.raises(DeviceGone, match="adb said 'device 'R58M1234ABC' not found'"):
        adb.read_files(["/x"])
    fake.update(gone_message="error: no devices/emulators found")
    with pytest.raises(DeviceGone, match="no devices/emulators found"):
        adb.push(__file__, "/data/local/tmp/x")
    fake.update(gone_message="grep: /dev/x: device not found", gone_rc=2)  # the device's own words: not adb's
    assert adb.shell(["grep", "x", "/dev/x"]).returncode == 2
    fake.update(gone_message="", gone_rc=255)  # adb exits 255 saying nothing: get-state decides
    with pytest.raises(DeviceGone, match=r"adb now reports it as not found"):
        adb.shell(["cat", "/x"])


# -- device state and the profile ------------------------------------------------------------------------------------

def test_android_profile_loads_and_names_these_parts():
    profile = load_profile("android")
    assert profile.transport == "adb" and profile.runners == ("android-executorch",)
    assert profile.meter == "android-battery" and profile.meter_config["current_sign"] == "auto"
    assert profile.extra["adb"]["work_dir"] == WORK and profile.extra["adb"]["dumpsys_unplug"] is False
    assert get_runner(profile.runners[0], profile.extra).runtime == "executorch"
    assert isinstance(get_meter(profile.meter, profile.meter_config), AndroidBatteryMeter)
    assert profile.throttle_files == () and profile.pin_clocks == ()


def test_device_state_reads_files_and_commands_on_the_device(fake):
    cpus = [f"/sys/devices/system/cpu/cpu{i}/cpufreq/scaling_governor" for i in (0, 4)]
    fake.set(rules=[
        rule(r"^shell sh -c 'for f in /sys/devices/system/cpu/cpu\*/cpufreq/scaling_governor;", stdout="\n".join(cpus)),
        rule(r"^shell grep -s -H '' /sys/devices/system/cpu/cpu0",
             stdout="".join(f"{p}:schedutil\n" for p in cpus)),
        rule(r"^shell grep -s -H '' /sys/class/power_supply/battery/status$",
             stdout="/sys/class/power_supply/battery/status:Discharging\n"),
        rule(r"^shell grep -s -H '' /sys/nope$", rc=2),
        rule(r"^shell getprop ro.product.model$", stdout="Pixel 7\n"),
        rule(r"^shell dumpsys nothing$", stderr="Can't find service: nothing\n", rc=0),
    ])
    profile = DeviceProfile("t", "", "adb", ("android-executorch",), None,
                            state_files={"governor": "/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor",
                                         "battery_status": f"{PS}/battery/status", "missing": "/sys/nope"},
                            state_commands={"model": ("getprop", "ro.product.model"),
                                            "service": ("dumpsys", "nothing")},
                            extra={"adb": {}})
    state = device_state(profile, SERIAL)
    assert state["device"] == SERIAL
    assert state["files"]["governor"] == "schedutil"
    assert state["files"]["battery_status"] == "Discharging"
    assert state["files"]["missing"].startswith("unreadable")
    assert state["commands"]["model"] == {"command": ["getprop", "ro.product.model"], "on_device": True,
                                          "returncode": 0, "output": "Pixel 7"}
    assert state["commands"]["service"]["output"] == "Can't find service: nothing"
    assert ["getprop", "ro.product.model"] in fake.shell_calls()  # ran over adb, not on the host


# -- the runner ------------------------------------------------------------------------------------------------------

def test_parse_recorded_executor_runner_output():
    flags = parse_flags((DATA / "executor_runner_help.txt").read_text())
    assert {"model_path", "num_executions", "cpu_threads", "inputs", "print_output", "help"} <= flags
    out = parse_runner_output((DATA / "runner_per_iteration_timed7.txt").read_text())
    assert out.iterations == [3.0, 3.125, 3.25, 3.375, 3.0, 3.125, 3.25]
    assert out.totals == [(7, 22.125)] and out.load_ms == [12.345678] and out.threads == [1]
    assert out.max_rss_kib == [21504]
    old = parse_runner_output((DATA / "runner_total_only_x5.txt").read_text())
    assert old.iterations == [] and [n for n, _ in old.totals] == [1] * 5 and len(old.max_rss_kib) == 5
    assert not parse_runner_output((DATA / "runner_no_logging.txt").read_text()).has_timings
    assert parse_runner_output("Maximum resident set size (kbytes): 777\n").max_rss_kib == [777]  # GNU time -v


def runner_rules(warmup_file: str, timed: dict) -> list[dict]:
    return [
        rule(rf"^shell mkdir -p {WORK}$"),
        rule(r"getprop ro.product.model", stdout="Pixel 7\n14\narm64-v8a\ngoogle/panther/panther:14/UQ1A/1:user\n"),
        rule(r"^shell test -x /data/local/tmp/executor_runner$"),
        rule(r"executor_runner --help$", stdout_file="executor_runner_help.txt", rc=1),  # gflags exits 1 on --help
        rule(r"^shell toybox time -v true$", stderr_file="runner_no_logging.txt"),
        rule(r"^shell log -t hpqdeploy "),
        rule(r"--num_executions=2$", stderr_file=warmup_file),
        timed,
    ]


@pytest.fixture
def export_dir(tmp_path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "model_b1.pte").write_bytes(b"ET12" + bytes(60))
    (out / "model_b4.pte").write_bytes(b"ET12" + bytes(60))
    return out


IMAGE = np.arange(3 * 4 * 4, dtype=np.float32).reshape(1, 3, 4, 4)
SETTINGS = RunSettings(batch=1, threads=1, warmup=2, iters=5)


def test_runner_pushes_runs_and_parses_per_iteration_times(fake, export_dir):
    fake.set(rules=runner_rules("runner_per_iteration_warmup2.txt",
                                rule(r"--num_executions=7$", stderr_file="runner_per_iteration_timed7.txt")))
    runner = get_runner("android-executorch", {"adb": {}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    assert ["push", str(export_dir / "model_b1.pte"), f"{WORK}/model_b1.pte"] in fake.calls()
    pushed_input = next(c for c in fake.calls() if c[:1] == ["push"] and c[2].endswith("input_0.bin"))
    assert pushed_input[2] == f"{WORK}/input_0.bin"
    timing = runner.run(SETTINGS)
    assert timing.times_ms == [3.25, 3.375, 3.0, 3.125, 3.25]  # the 7 executions less the 2 warm-up ones
    assert timing.batch == 1 and timing.inferences == 5 and timing.t1 > timing.t0
    timed = fake.shell_calls()[-1]
    assert timed == ["toybox", "time", "-v", "/data/local/tmp/executor_runner", f"--model_path={WORK}/model_b1.pte",
                     "--print_output=none", "--cpu_threads=1", f"--inputs={WORK}/input_0.bin", "--num_executions=7"]
    assert "2 warm-up executions" in timing.window_covers and "program load (12.3 ms" in timing.window_covers
    assert any("'Iteration i of N: X ms'" in n for n in timing.notes)
    assert any("num threads = 1" in n for n in timing.notes)
    assert runner.memory()["peak_rss_bytes"] == 21504 * 1024
    info = runner.info()
    assert info["device"] == SERIAL and info["ro.product.model"] == "Pixel 7" and info["log_source"] == "stdio"
    assert info["timing"] == "per-iteration log lines of one process"
    # a second repeat needs no separate warm-up invocation: the timed process warms itself up
    calls = len(fake.calls())
    runner.run(SETTINGS)
    assert len(fake.calls()) == calls + 1
    runner.close()


def test_runner_with_total_only_output_times_separate_processes(fake, export_dir):
    fake.set(rules=runner_rules("runner_total_only_warmup2.txt",
                                rule(r"while \[ \$i -lt 5 \].*--num_executions=1 \|\| exit",
                                     stderr_file="runner_total_only_x5.txt")))
    runner = AndroidExecuTorchRunner({"adb": {}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    timing = runner.run(SETTINGS)
    assert timing.times_ms == [4.90625, 4.71875, 4.765625, 4.8125, 4.703125]
    assert any("prints only a total" in n and "first execution after loading" in n for n in timing.notes)
    assert any("--cpu_threads has no effect" in n for n in timing.notes)  # this older output logs no pool reset
    assert "5 executor_runner processes" in timing.window_covers
    assert runner.memory()["peak_rss_bytes"] == (20000 + 37 * 4) * 1024
    # each repeat runs its separate warm-up process again (the timed processes cannot warm up in-process)
    calls = len(fake.calls())
    runner.run(SETTINGS)
    assert len(fake.calls()) == calls + 2


def test_runner_reads_logcat_when_built_with_the_android_pal(fake, export_dir):
    fake.set(rules=[rule(r"^shell logcat -d -v raw -s hpqdeploy:I ExecuTorch:I$",
                         outputs=[{"stdout_file": "logcat_raw_warmup2.txt"}, {"stdout_file": "logcat_raw_timed7.txt"}]),
                    *runner_rules("runner_no_logging.txt",
                                  rule(r"--num_executions=7$", stderr_file="runner_no_logging.txt"))])
    runner = AndroidExecuTorchRunner({"adb": {}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    timing = runner.run(SETTINGS)
    assert timing.times_ms == [3.25, 3.375, 3.0, 3.125, 3.25]  # the stale lines before the marker are ignored
    assert runner.log_source == "logcat" and any("logcat" in n for n in timing.notes)
    assert runner.memory()["peak_rss_bytes"] == 19876 * 1024  # still from the time command's stderr


def test_runner_without_logging_says_how_to_rebuild(fake, export_dir):
    fake.set(rules=[rule(r"^shell logcat", stdout="{marker}\n"),
                    *runner_rules("runner_no_logging.txt", rule(r"--num_executions=7$"))])
    runner = AndroidExecuTorchRunner({"adb": {}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    with pytest.raises(RunnerUnavailable, match=r"printed no timings on stdout/stderr or in logcat .*"
                                                r"-DEXECUTORCH_ENABLE_LOGGING=ON"):
        runner.run(SETTINGS)


@pytest.mark.parametrize("seconds, executions, warm, timed, note", [
    ({"min_seconds": 0.02}, 9, 2, 7, "7 timed executions instead of 5"),
    ({"warmup_seconds": 0.02}, 12, 7, 5, "7 warm-up executions instead of 2")], ids=["min_seconds", "warmup_seconds"])
def test_runner_seconds_extend_the_executions(fake, export_dir, seconds, executions, warm, timed, note):
    """The warm-up invocation's mean (3.0625 ms) sets how many executions 20 ms take: 7."""
    lines = "".join(f"I 00:00:00.0001{i:02d} executorch:executor_runner.cpp:33] Iteration {i + 1} of {executions}: "
                    f"{3 + i / 8:f} ms\n" for i in range(executions))
    fake.set(rules=runner_rules("runner_per_iteration_warmup2.txt",
                                rule(rf"--num_executions={executions}$", stderr=lines)))
    runner = AndroidExecuTorchRunner({"adb": {}})
    settings = RunSettings(batch=1, threads=1, warmup=2, iters=5, **seconds)
    runner.prepare(export_dir, IMAGE, settings)
    timing = runner.run(settings)
    assert len(timing.times_ms) == timed and timing.times_ms[0] == 3 + warm / 8
    assert any(note in n for n in timing.notes)
    assert f"{warm} warm-up executions, input preparation" in timing.window_covers


def test_runner_failure_and_missing_pieces_are_one_line(fake, export_dir):
    fake.set(rules=runner_rules("runner_per_iteration_warmup2.txt", rule(
        r"--num_executions=7$", stderr="E 00:00:00.000100 executorch:method.cpp:700] Missing operator: "
                                       "[0] quantized_decomposed::embedding_byte.out\nAborted\n", rc=134)))
    runner = AndroidExecuTorchRunner({"adb": {}})
    with pytest.raises(RunnerUnavailable, match=r"has no model_b2.pte for batch 2 \(it has: model_b1.pte, "
                                                r"model_b4.pte\)"):
        runner.prepare(export_dir, IMAGE, RunSettings(batch=2))
    runner.prepare(export_dir, IMAGE, SETTINGS)
    with pytest.raises(RunnerUnavailable, match=r"executor_runner failed on R58M1234ABC \(exit 134\) running "
                                                r"model_b1.pte: E .*Missing operator: \[0\] quantized_decomposed"):
        runner.run(SETTINGS)


def test_runner_missing_on_device_or_not_executor_runner(fake, export_dir):
    fake.set(rules=[rule(r"^shell test -x", rc=1), *runner_rules("x", rule("never"))])
    with pytest.raises(RunnerUnavailable, match=r"no executable /data/local/tmp/executor_runner on R58M1234ABC: "
                                                r"build executor_runner for Android arm64"):
        AndroidExecuTorchRunner({"adb": {}}).prepare(export_dir, IMAGE, SETTINGS)
    fake.set(rules=[rule(r"executor_runner --help$", stderr="/system/bin/sh: /data/local/tmp/executor_runner: not "
                                                            "executable: 64-bit ELF file\n", rc=126),
                    *runner_rules("x", rule("never"))])
    with pytest.raises(RunnerUnavailable, match=r"lists no --model_path.*not executable: 64-bit ELF file"):
        AndroidExecuTorchRunner({"adb": {}}).prepare(export_dir, IMAGE, SETTINGS)


def test_runner_device_vanishing_mid_run(fake, export_dir):
    fake.set(rules=runner_rules("runner_per_iteration_warmup2.txt",
                                rule(r"--num_executions=7$", stderr_file="runner_per_iteration_timed7.txt")))
    runner = AndroidExecuTorchRunner({"adb": {}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    fake.update(fail_after=len(fake.calls()) + 1)  # the warm-up invocation answers, the timed one finds no device
    with pytest.raises(DeviceGone, match=r"device R58M1234ABC went away during `toybox time -v "
                                          r"/data/local/tmp/executor_runner"):
        runner.run(SETTINGS)
    runner.close()  # nothing to undo, and no error from a gone device


def test_runner_dumpsys_unplug_is_undone(fake, export_dir):
    fake.set(rules=[rule(r"^shell dumpsys battery (unplug|reset)$"),
                    *runner_rules("runner_per_iteration_warmup2.txt", rule("never"))])
    runner = AndroidExecuTorchRunner({"adb": {"dumpsys_unplug": True, "cleanup": True}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    runner.close()
    shells = fake.shell_calls()
    assert ["dumpsys", "battery", "unplug"] in shells and shells[-2] == ["dumpsys", "battery", "reset"]
    assert shells[-1] == ["rm", "-f", f"{WORK}/model_b1.pte", f"{WORK}/input_0.bin"]


# -- the battery meter -----------------------------------------------------------------------------------------------

def supplies(usb_online: str = "0") -> list[dict]:
    types = {"battery": "Battery", "usb": "USB", "wireless": "Wireless", "maxfg": "Unknown"}
    grep = "".join(f"{PS}/{n}/type:{t}\n" for n, t in types.items())
    grep += f"{PS}/usb/online:{usb_online}\n{PS}/wireless/online:0\n{PS}/maxfg/online:1\n"
    return [rule(rf"^shell ls {PS}$", stdout="battery\nusb\nwireless\nmaxfg\n"),
            rule(r"^shell grep -s -H '' ", stdout=grep)]


def battery(samples: list[tuple[int, int, str]], usb_online: str = "0") -> list[dict]:
    outputs = [{"stdout": f"{i}\n{v}\n{s}\n"} for i, v, s in samples]
    return [*supplies(usb_online), rule(rf"^shell cat {PS}/battery/current_now {PS}/battery/voltage_now "
                                        rf"{PS}/battery/status$", outputs=outputs)]


def test_battery_discharge_negative(fake):
    fake.set(rules=battery([(-400000, 3900000, "Discharging"), (-410000, 3890000, "Discharging"),
                            (-500000, 3880000, "Discharging")]))
    meter = get_meter("android-battery", {"current_sign": "discharge_negative", "interval_ms": 1, "serial": SERIAL})
    meter.open()
    reading = meter.read()
    assert reading.watts == pytest.approx(0.5 * 3.88) and reading.parts == {"battery": pytest.approx(1.94)}
    described = meter.describe()
    assert described["current_sign"] == "configured: discharge_negative"
    assert described["adb_round_trip_ms"]["samples"] == 3
    assert meter.interval_s == pytest.approx(sum(meter.round_trips_s) / 3)  # one adb round trip bounds the period
    assert described["online_supplies_not_counted_as_chargers"] == ["maxfg (Unknown)"]
    assert "allow_charging" not in described


def test_battery_discharge_positive_and_auto(fake):
    samples = [(450000, 3900000, "Discharging"), (460000, 3900000, "Discharging"), (300000, 4000000, "Discharging")]
    fake.set(rules=battery(samples))
    meter = AndroidBatteryMeter({"current_sign": "discharge_positive"})
    meter.open()
    assert meter.read().watts == pytest.approx(1.2)
    fake.set(rules=battery(samples))
    auto = AndroidBatteryMeter({})
    auto.open()
    assert auto.read().watts == pytest.approx(1.2)
    assert auto.describe()["current_sign"].startswith("auto: current_now was positive")
    # the wrong convention reads a discharging battery as charging, and says so
    fake.set(rules=battery(samples))
    wrong = AndroidBatteryMeter({"current_sign": "discharge_negative"})
    wrong.open()
    with pytest.raises(MeterUnavailable, match="started charging"):
        wrong.read()


def test_battery_units(fake):
    samples = [(-450, 3900000, "Discharging")] * 3
    fake.set(rules=battery(samples))
    with pytest.raises(MeterUnavailable, match=r'implausibly low: set current_unit = "mA"'):
        AndroidBatteryMeter({}).open()
    fake.set(rules=battery(samples))
    meter = AndroidBatteryMeter({"current_unit": "mA"})
    meter.open()
    assert meter.read().watts == pytest.approx(0.45 * 3.9)
    fake.set(rules=battery([(-450000, 3900, "Discharging")] * 3))
    with pytest.raises(MeterUnavailable, match="voltage_now reads 0.0039 V .*set voltage_unit"):
        AndroidBatteryMeter({}).open()


def test_battery_refuses_while_charging(fake):
    fake.set(rules=battery([(300000, 4200000, "Charging")] * 3, usb_online="1"))
    with pytest.raises(MeterUnavailable, match=r"not the only supply \(status is Charging\).*allow_charging = true"):
        AndroidBatteryMeter({"current_sign": "discharge_negative"}).open()
    fake.set(rules=battery([(-300000, 4200000, "Not charging")] * 3, usb_online="1"))
    with pytest.raises(MeterUnavailable, match=r"charger online: usb \(USB\)"):
        AndroidBatteryMeter({"current_sign": "discharge_negative"}).open()
    fake.set(rules=battery([(300000, 4200000, "Charging")] * 3, usb_online="1"))
    with pytest.raises(MeterUnavailable, match='current_sign = "auto" learns the sign'):
        AndroidBatteryMeter({"allow_charging": True}).open()


def test_battery_allow_charging_records_it(fake):
    fake.set(rules=battery([(300000, 4200000, "Charging")] * 3, usb_online="1"))
    meter = AndroidBatteryMeter({"current_sign": "discharge_negative", "allow_charging": True})
    meter.open()
    assert meter.read().watts == pytest.approx(-0.3 * 4.2)  # net power into the battery: not the device's draw
    described = meter.describe()
    assert described["allow_charging"] is True
    assert described["charging"]["chargers_online_at_open"] == ["usb (USB)"]
    assert described["charging"]["samples_charging"] == 1


def test_battery_charger_plugged_in_mid_run(fake):
    fake.set(rules=battery([(-400000, 3900000, "Discharging")] * 2 + [(200000, 4100000, "Charging")]))
    meter = AndroidBatteryMeter({"current_sign": "discharge_negative"})
    meter.open()
    with pytest.raises(MeterUnavailable, match="started charging during the run"):
        meter.read()


def test_battery_device_vanishing_mid_run(fake):
    fake.set(rules=battery([(-400000, 3900000, "Discharging")] * 3))
    meter = AndroidBatteryMeter({})
    meter.open()
    assert meter.read().watts == pytest.approx(1.56)
    fake.update(fail_after=len(fake.calls()))
    with pytest.raises(MeterUnavailable, match=r"android-battery: device R58M1234ABC went away"):
        meter.read()


def test_battery_bad_config_is_refused():
    from hpqdeploy.errors import UserError

    with pytest.raises(UserError, match="current_sign must be one of"):
        AndroidBatteryMeter({"current_sign": "negative"})
    with pytest.raises(UserError, match="current_unit must be one of uA, mA"):
        AndroidBatteryMeter({"current_unit": "A"})


# -- the ODPM meter --------------------------------------------------------------------------------------------------

def odpm(outputs: list[dict]) -> list[dict]:
    return [rule(r"^shell sh -c 'for f in /sys/bus/iio/devices/iio:device\*/energy_value;", stdout="\n".join(ODPM)),
            rule(rf"^shell cat {ODPM[0]} {ODPM[1]}$", outputs=outputs)]


A = {"stdout_file": ["odpm_device0_a.txt", "odpm_device1_a.txt"]}
B = {"stdout_file": ["odpm_device0_b.txt", "odpm_device1_b.txt"]}


def test_parse_odpm_recorded():
    stamp, rails = parse_odpm((DATA / "odpm_device0_a.txt").read_text())
    assert stamp == 358356 and rails["S2M_VDD_CPUCL2"] == 912344001 and len(rails) == 6


def test_odpm_energy_per_rail(fake):
    fake.set(rules=odpm([A, A, B]))
    meter = get_meter("android-odpm", {})
    meter.open()
    reading = meter.read()
    assert reading.joules == pytest.approx(1.5 + 0.25 + 0.5 + 9 * 0.01)
    assert reading.parts["S2M_VDD_CPUCL2"] == pytest.approx(1.5) and len(reading.parts) == 12
    assert meter.describe()["units"].startswith("microwatt-seconds")
    fake.set(rules=odpm([A, A, B]))
    subset = AndroidOdpmMeter({"rails": ["S2M_VDD_CPUCL2", "S10M_VDD_TPU"]})
    subset.open()
    assert subset.read().joules == pytest.approx(1.75)


def test_odpm_unavailable(fake):
    fake.set(rules=odpm([{"stderr": f"cat: {ODPM[0]}: Permission denied\n", "rc": 1}]))
    with pytest.raises(MeterUnavailable, match=r"Permission denied \(reading ODPM usually needs root"):
        AndroidOdpmMeter({}).open()
    fake.set(rules=[rule(r"^shell sh -c 'for f in /sys/bus/iio", stdout="")])
    with pytest.raises(MeterUnavailable, match="no ODPM rails on R58M1234ABC"):
        AndroidOdpmMeter({}).open()
    fake.set(rules=odpm([A]))
    with pytest.raises(MeterUnavailable, match="rails NOPE not found"):
        AndroidOdpmMeter({"rails": ["NOPE"]}).open()
    fake.set(rules=odpm([B, B, A]))  # counters going backwards: the ODPM was reset
    meter = AndroidOdpmMeter({})
    meter.open()
    with pytest.raises(MeterUnavailable, match="went backwards"):
        meter.read()


# -- together, as the profile engine drives them ----------------------------------------------------------------------

def test_battery_energy_over_the_runner_window(fake, export_dir):
    from hpqdeploy.device.meters.recorder import PowerRecorder

    fake.set(rules=[*battery([(-400000, 3900000, "Discharging")]),
                    *runner_rules("runner_per_iteration_warmup2.txt",
                                  rule(r"--num_executions=7$", stderr_file="runner_per_iteration_timed7.txt"))])
    meter = AndroidBatteryMeter({"current_sign": "discharge_negative", "interval_ms": 20})
    meter.open()
    runner = AndroidExecuTorchRunner({"adb": {}})
    runner.prepare(export_dir, IMAGE, SETTINGS)
    with PowerRecorder(meter) as rec:
        timing = runner.run(SETTINGS)
    window = rec.window(timing.t0, timing.t1)
    assert window.mean_watts == pytest.approx(0.4 * 3.9)
    assert window.seconds == pytest.approx(timing.t1 - timing.t0)
    assert window.joules / timing.inferences == pytest.approx(1.56 * (timing.t1 - timing.t0) / 5)
