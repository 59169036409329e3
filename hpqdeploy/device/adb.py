"""A small adb client: find the binary, choose the device, run argument lists on it, push and pull files.

Commands are always argument lists. On the host they go to `subprocess` as lists; on the device `adb shell` hands
its arguments to the device's shell, so they are quoted for it with `shlex.join` (a device-side loop is built the
same way and run as `sh -c SCRIPT`). Every failure is one line a person can act on:

- `AdbUnavailable`: no adb binary, no device, several devices, a device `unauthorized` or `offline`;
- `DeviceGone`: the device disappeared while in use (adb says "device ... not found" / "no devices/emulators
  found", or exits 255 and `get-state` no longer says `device`);
- `AdbTimeout`: a command ran past its timeout (the device-side process may still be running).

`device_state(profile, serial)` and `pin_clocks(profile, serial)` run a device profile's `[clocks]` entries on the
device, for the profile engine when a profile's transport is "adb".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hpqdeploy.device.profiles import collapse_state
from hpqdeploy.errors import UserError

DEFAULT_TIMEOUT_S = 30.0
PUSH_TIMEOUT_S = 300.0
INSTALL_HINT = ("install Debian's `adb` package (apt-get install adb) or Android SDK platform-tools, "
                "or set `adb = \"/path/to/adb\"` in the [adb] table of profiles/android.toml")
# adb's own words when the device is gone ("adb: " in newer releases, "error: " in older ones); anchored to that
# prefix so a device-side tool's message cannot be mistaken for it
_GONE = re.compile(r"(?:adb|error): (device '[^']*' not found|device not found|no devices/emulators found|"
                   r"device offline|device unauthorized|device still authorizing)")
_SAFE_GLOB = re.compile(r"[A-Za-z0-9_./*?\[\]:@+,=-]+")  # what a state-file glob may hold (the device shell expands it)


class AdbError(UserError):
    """An adb failure, as one line."""


class AdbUnavailable(AdbError):
    """adb cannot be used here: no binary, no device, or not exactly one usable device."""


class DeviceGone(AdbError):
    """The device vanished while in use (unplugged, rebooted, adb server restarted)."""


class AdbTimeout(AdbError):
    """A command ran past its timeout."""


@dataclass
class ShellResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # host wall time of the adb call

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]


def find_adb(config: dict | None = None) -> str:
    """The adb binary: `adb` from the config (a path or a name on PATH), else `adb` on PATH."""
    wanted = str((config or {}).get("adb") or "adb")
    if os.sep in wanted:
        path = Path(wanted).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise AdbUnavailable(f"adb not found at {wanted} (the [adb] `adb` setting): {INSTALL_HINT}")
    found = shutil.which(wanted)
    if found is None:
        raise AdbUnavailable(f"{wanted} not found on PATH: {INSTALL_HINT}")
    return found


def parse_devices(text: str) -> list[tuple[str, str]]:
    """(serial, state) pairs from `adb devices` (daemon start-up chatter and the header skipped)."""
    pairs = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("*", "List of devices")) or "\t" not in line:
            continue
        serial, state = line.split("\t", 1)
        state = state.strip()
        state = "no permissions" if state.startswith("no permissions") else (state.split() or ["unknown"])[0]
        pairs.append((serial.strip(), state))
    return pairs


_STATE_FIX = {
    "unauthorized": "unlock the device and accept the 'Allow USB debugging' prompt (or revoke and re-plug)",
    "offline": "re-plug the cable or run `adb kill-server`; if it persists, reboot the device",
    "no permissions": "the host user cannot open the USB device: add udev rules for it (Debian: the "
                      "android-sdk-platform-tools-common package) and re-plug",
    "authorizing": "wait a moment for the authorization to finish, then retry",
}


def _state_reason(serial: str, state: str) -> str:
    verb = "has" if state == "no permissions" else "is"
    return f"device {serial} {verb} {state}: {_STATE_FIX.get(state, 'it must be in state `device`')}"


def choose_serial(devices: list[tuple[str, str]], serial: str | None) -> str:
    """The serial to use: the one asked for (must be in state `device`), else the only attached device."""
    if serial:
        for s, state in devices:
            if s == serial:
                if state != "device":
                    raise AdbUnavailable(_state_reason(s, state))
                return s
        attached = ", ".join(f"{s} ({st})" for s, st in devices) or "none"
        raise AdbUnavailable(f"device {serial} not found by adb (attached: {attached}): check the cable, "
                             "`adb devices`, or the serial")
    if not devices:
        raise AdbUnavailable("no Android device attached (`adb devices` lists none): connect one with USB debugging "
                             "enabled, or `adb connect HOST:PORT` for wireless debugging")
    ready = [s for s, state in devices if state == "device"]
    if len(ready) == 1:
        return ready[0]
    if len(ready) > 1:
        raise AdbUnavailable(f"{len(ready)} devices attached ({', '.join(ready)}): choose one with --serial SERIAL "
                             "(or `serial` in the [adb] table)")
    reasons = "; ".join(_state_reason(s, state) for s, state in devices)
    raise AdbUnavailable(reasons if len(devices) == 1 else f"no attached device is usable: {reasons}")


class Adb:
    """One device, reached through one adb binary. `Adb.connect(config)` finds both."""

    def __init__(self, path: str, serial: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.path = path
        self.serial = serial
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, config: dict | None = None, serial: str | None = None) -> Adb:
        """`config`: the [adb] table (`adb`, `serial`, `timeout_s`); `serial` overrides it (--serial).
        Without either, ANDROID_SERIAL (adb's own variable) or the only attached device."""
        config = dict(config or {})
        path = find_adb(config)
        wanted = serial or config.get("serial") or os.environ.get("ANDROID_SERIAL") or None
        try:
            proc = subprocess.run([path, "devices"], capture_output=True, text=True, errors="replace",
                                  timeout=float(config.get("timeout_s", DEFAULT_TIMEOUT_S)))
        except subprocess.TimeoutExpired:
            raise AdbUnavailable("`adb devices` did not answer: restart the server (`adb kill-server`)") from None
        except OSError as exc:
            raise AdbUnavailable(f"{path} cannot run ({exc.strerror}): {INSTALL_HINT}") from None
        if proc.returncode != 0:
            raise AdbUnavailable(f"`adb devices` failed (exit {proc.returncode}): "
                                 f"{_first_line(proc.stderr + proc.stdout) or 'no message'}")
        chosen = choose_serial(parse_devices(proc.stdout), wanted)
        return cls(path, chosen, float(config.get("timeout_s", DEFAULT_TIMEOUT_S)))

    # -- raw calls ---------------------------------------------------------------------------------------------------

    def _call(self, args: list[str], timeout: float | None, what: str) -> ShellResult:
        argv = [self.path, "-s", self.serial, *args]
        timeout = self.timeout_s if timeout is None else timeout
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise AdbTimeout(f"{what} on {self.serial} timed out after {timeout:g} s (the device-side process may "
                             "still run; raise `timeout_s` / `run_timeout_s` in the [adb] table if it is just slow)"
                             ) from None
        except OSError as exc:
            raise AdbUnavailable(f"{self.path} cannot run ({exc.strerror}): {INSTALL_HINT}") from None
        result = ShellResult(list(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)
        if proc.returncode != 0:
            self._check_gone(result, what)
        return result

    def _check_gone(self, result: ShellResult, what: str) -> None:
        said = result.stderr + result.stdout
        match = _GONE.search(said)
        if match:
            raise DeviceGone(f"device {self.serial} went away during {what}: adb said '{match.group(1)}'")
        if result.returncode == 255 and not said.strip():  # adb's own failure code with nothing said: ask adb
            state = self.state()
            if state != "device":
                raise DeviceGone(f"device {self.serial} went away during {what} (adb now reports it as {state})")

    def state(self) -> str:
        """`adb get-state`: "device", "offline", "unauthorized", ... or "not found"."""
        try:
            proc = subprocess.run([self.path, "-s", self.serial, "get-state"], capture_output=True, text=True,
                                  errors="replace", timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, OSError):
            return "not answering"
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().split()[0]
        return "not found"

    # -- the public surface ------------------------------------------------------------------------------------------

    def shell(self, args: Sequence[str], timeout: float | None = None, check: bool = False) -> ShellResult:
        """Run an argument list on the device. `check=True` turns a non-zero exit into AdbError (one line)."""
        args = [str(a) for a in args]
        if not args:
            raise ValueError("empty command")
        result = self._call(["shell", shlex.join(args)], timeout, f"`{shlex.join(args)[:80]}`")
        if check and result.returncode != 0:
            raise AdbError(f"`{shlex.join(args)[:120]}` failed on {self.serial} (exit {result.returncode}): "
                           f"{_first_line(result.output) or 'no output'}")
        return result

    def script(self, commands: Sequence[Sequence[str]], timeout: float | None = None,
               repeat: int = 1) -> ShellResult:
        """Several argument lists run one after another in one device shell (`sh -c`), or the whole list `repeat`
        times in a loop that stops at the first failure; each command is quoted with shlex.join, so the script holds
        no unquoted text of ours."""
        quoted = [shlex.join([str(a) for a in c]) for c in commands]
        body = "; ".join(quoted)
        if repeat > 1:  # the loop stops at the first failing command, with its exit status
            body = f"i=0; while [ $i -lt {int(repeat)} ]; do {' && '.join(quoted)} || exit $?; i=$((i+1)); done"
        return self.shell(["sh", "-c", body], timeout=timeout)

    def push(self, local: Path | str, remote: str, timeout: float | None = None) -> None:
        local = Path(local)
        if not local.is_file():
            raise AdbError(f"cannot push {local}: no such file")
        result = self._call(["push", str(local), remote], timeout or PUSH_TIMEOUT_S, f"push of {local.name}")
        if result.returncode != 0:
            raise AdbError(f"adb push {local} {remote} failed: {_first_line(result.output) or 'no message'}")

    def pull(self, remote: str, local: Path | str, timeout: float | None = None) -> None:
        result = self._call(["pull", remote, str(local)], timeout or PUSH_TIMEOUT_S, f"pull of {remote}")
        if result.returncode != 0:
            raise AdbError(f"adb pull {remote} failed: {_first_line(result.output) or 'no message'}")

    def read_files(self, paths: Sequence[str], timeout: float | None = None) -> dict[str, str | None]:
        """Each file's text (stripped) in one call, None where missing or unreadable (grep -s -H: toybox)."""
        paths = [str(p) for p in paths]
        if not paths:
            return {}
        result = self.shell(["grep", "-s", "-H", "", *paths], timeout=timeout)
        values: dict[str, list[str]] = {}
        longest_first = sorted(paths, key=len, reverse=True)  # sysfs paths hold ':' (iio:device0)
        for line in result.stdout.splitlines():
            for p in longest_first:
                if line.startswith(p + ":"):
                    values.setdefault(p, []).append(line[len(p) + 1:])
                    break
        return {p: "\n".join(values[p]).strip() if p in values else None for p in paths}

    def glob(self, pattern: str, timeout: float | None = None) -> list[str]:
        """Paths on the device matching a shell glob (expanded by the device shell; the pattern is checked to
        hold only path characters, so nothing else reaches that shell unquoted)."""
        if not _SAFE_GLOB.fullmatch(pattern):
            raise AdbError(f"refusing device glob {pattern!r}: only letters, digits and _ . / * ? [ ] : @ + , = - "
                           "are allowed")
        result = self.shell(["sh", "-c", f'for f in {pattern}; do [ -e "$f" ] && echo "$f"; done'], timeout=timeout)
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def connect(extra: dict | None, serial: str | None = None) -> Adb:
    """The device of a profile: `extra` is `DeviceProfile.extra` (its [adb] table is used) or the table itself."""
    extra = dict(extra or {})
    return Adb.connect(extra.get("adb", extra), serial)


# -- the profile engine's hooks for transport = "adb" ----------------------------------------------------------------

def _read_state_files(adb: Adb, patterns: dict[str, str]) -> dict:
    state = {}
    for label, pattern in patterns.items():
        try:
            paths = adb.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
            values = {p: (v if v is not None else "unreadable (missing, or denied by permissions/SELinux)")
                      for p, v in adb.read_files(paths).items()}
            state[label] = collapse_state(values) if values else None
        except DeviceGone:
            raise
        except AdbError as exc:
            state[label] = f"error: {exc}"
    return state


def run_on_device(adb: Adb, args: Sequence[str], timeout: float = 20.0) -> dict:
    """One state or pin command, recorded like the local engine records its commands (errors as strings)."""
    try:
        result = adb.shell(list(args), timeout=timeout)
    except DeviceGone:
        raise
    except AdbError as exc:
        return {"command": list(args), "on_device": True, "error": str(exc)}
    return {"command": list(args), "on_device": True, "returncode": result.returncode,
            "output": result.output.strip()}


def device_state(profile, serial: str | None = None, adb: Adb | None = None) -> dict:
    """The profile's state files and commands, read on the device over adb. Never raises: a missing adb or device
    is recorded as the reason, as is every file or command that fails."""
    try:
        adb = adb or connect(profile.extra, serial)
        return {"device": adb.serial, "files": _read_state_files(adb, profile.state_files),
                "commands": {k: run_on_device(adb, v) for k, v in profile.state_commands.items()}}
    except AdbError as exc:
        return {"error": str(exc)}


def pin_clocks(profile, serial: str | None = None, adb: Adb | None = None) -> list[dict]:
    """The profile's [clocks] pin commands, run on the device (most need root: `adb root` on a userdebug build)."""
    try:
        adb = adb or connect(profile.extra, serial)
        return [run_on_device(adb, c) for c in profile.pin_clocks]
    except AdbError as exc:
        return [{"error": str(exc)}]
