"""Jetson power from NVIDIA's `tegrastats`, the alternative to reading the INA3221 files directly.

`tegrastats --interval MS` prints one line per period; the power rails appear as `NAME current/average`:

- JetPack 5 and 6: `VDD_IN 5123mW/5010mW VDD_CPU_GPU_CV 1402mW/1388mW VDD_SOC 1521mW/1519mW` (Orin Nano/NX,
  Xavier NX) or `VDD_GPU_SOC ... VDD_CPU_CV ... VIN_SYS_5V0 ... VDDQ_VDD2_1V8AO ...` (AGX Orin);
- JetPack 4: no unit, `POM_5V_IN 2345/2345 POM_5V_GPU 0/0 POM_5V_CPU 394/394` (Nano, TX2) or `VDD_IN 3920/3920`
  (Xavier NX); the numbers are milliwatts.

The first number is the rail's power at the moment of the line, the second tegrastats' running average since it
started; only the first is used (the recorder integrates). The board total is the sum of `total_rails` (default
VDD_IN, else POM_5V_IN). The line's time is when this process read it: tegrastats prints at the end of its period,
so readings lag the hardware by up to one period plus the pipe, which is why its interval should stay short (the
INA3221 meter reads the same sensors without that lag).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading, register_meter

# NAME cur/avg with optional mW: not RAM/SWAP (MB) nor IRAM (kB), whose second number is followed by a unit
RAIL_RE = re.compile(r"(?<![\w@\[])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)MB\b")
NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})
DEFAULT_TOTALS = (["VDD_IN"], ["POM_5V_IN"])


@dataclass
class TegraLine:
    rails_mw: dict[str, int] = field(default_factory=dict)  # instantaneous milliwatts per rail
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None


def parse_line(line: str) -> TegraLine:
    """The power rails (current value, mW) and RAM use of one tegrastats line."""
    parsed = TegraLine()
    for name, current, _average in RAIL_RE.findall(line):
        if name not in NOT_RAILS:
            parsed.rails_mw[name] = int(current)
    ram = RAM_RE.search(line)
    if ram:
        parsed.ram_used_mb, parsed.ram_total_mb = int(ram.group(1)), int(ram.group(2))
    return parsed


@dataclass
class _Sample:
    t: float
    seq: int
    line: TegraLine


@register_meter("tegrastats")
class TegrastatsMeter(PowerMeter):
    """Runs `tegrastats --interval MS` and parses its lines in a reader thread; config: `interval_ms`,
    `total_rails`, `binary` (default `tegrastats` on PATH), `first_line_timeout_s`, `line_buffered` (run it under
    `stdbuf -oL` where stdbuf exists, so a line written to the pipe is not held in a stdio buffer)."""

    kind = "power"

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._latest: _Sample | None = None
        self._seq = 0
        self._returned = 0  # seq of the last sample read() returned
        self._ended = False
        self._last_other = ""  # last line without rails: the error message if tegrastats dies
        self.ram_used_peak_mb: int | None = None
        self.ram_total_mb: int | None = None

    @property
    def interval_ms(self) -> int:
        return max(1, int(round(float(self.config.get("interval_ms", 100)))))

    def open(self) -> None:
        binary = self.config.get("binary", "tegrastats")
        exe = shutil.which(binary)
        if exe is None:
            raise MeterUnavailable(f"power: no {binary} binary on PATH (it ships with Jetson Linux as "
                                   "/usr/bin/tegrastats; in a container, mount it or use the ina3221 meter)")
        self.command = [exe, "--interval", str(self.interval_ms)]
        stdbuf = shutil.which("stdbuf")
        if stdbuf and self.config.get("line_buffered", True):  # a line as soon as tegrastats prints it, not per 4 KiB
            self.command = [stdbuf, "-oL", *self.command]
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as exc:
            raise MeterUnavailable(f"power: cannot start {exe}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._reader, name="tegrastats-reader", daemon=True)
        self._thread.start()
        timeout = float(self.config.get("first_line_timeout_s", max(2.0, 5 * self.interval_ms / 1000)))
        try:
            first = self._wait_fresh(timeout)
        except MeterUnavailable:
            self.close()
            raise
        found = ", ".join(first.line.rails_mw)
        total = self.config.get("total_rails")
        if total is None:
            total = next((t for t in DEFAULT_TOTALS if t[0] in first.line.rails_mw), None)
            if total is None:
                self.close()
                raise MeterUnavailable(f"power: tegrastats shows no VDD_IN or POM_5V_IN rail; set total_rails in the "
                                       f"device profile's [meter] table (rails found: {found})")
        missing = [r for r in total if r not in first.line.rails_mw]
        if missing:
            self.close()
            raise MeterUnavailable(f"power: rail {', '.join(missing)} named in total_rails is not in tegrastats' "
                                   f"output (found: {found}); fix total_rails in the device profile")
        self.total_rails = list(total)
        self.first = self._reading(first)

    def _reader(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            t = time.monotonic()
            line = parse_line(raw)
            with self._cond:
                if line.rails_mw:
                    self._seq += 1
                    self._latest = _Sample(t, self._seq, line)
                    if line.ram_used_mb is not None:
                        self.ram_total_mb = line.ram_total_mb
                        self.ram_used_peak_mb = max(self.ram_used_peak_mb or 0, line.ram_used_mb)
                elif raw.strip():
                    self._last_other = raw.strip()
                self._cond.notify_all()
        proc.wait()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _death(self) -> str:
        code = self._proc.returncode if self._proc is not None else None
        why = f": {self._last_other[:200]}" if self._last_other else ""
        return f"tegrastats exited with code {code}{why}"

    def _wait_fresh(self, timeout: float) -> _Sample:
        """The first sample newer than the last one returned; MeterUnavailable if tegrastats died or went quiet."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.seq <= self._returned:
                if self._ended:
                    raise MeterUnavailable(f"power: {self._death()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MeterUnavailable(f"power: tegrastats printed no power rails for {timeout:g} s "
                                           "(JetPack 4 needs root to read the rails; check `tegrastats` by hand)")
                self._cond.wait(left)
            self._returned = self._latest.seq
            return self._latest

    def _reading(self, sample: _Sample) -> Reading:
        parts = {name: mw / 1000 for name, mw in sample.line.rails_mw.items()}
        missing = [r for r in self.total_rails if r not in parts]
        if missing:
            raise MeterUnavailable(f"power: rail {', '.join(missing)} disappeared from tegrastats' output")
        return Reading(t=sample.t, watts=sum(parts[r] for r in self.total_rails), parts=parts)

    def read(self) -> Reading:
        """The next line's rails (waits up to a few periods for it, so readings are never repeated)."""
        with self._cond:
            if self._ended:
                raise MeterUnavailable(f"power: {self._death()} during the run")
        return self._reading(self._wait_fresh(max(1.0, 5 * self.interval_ms / 1000)))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if proc is not None and proc.stdout is not None and (self._thread is None or not self._thread.is_alive()):
            proc.stdout.close()
        self._proc = proc  # keep the exit code for the error messages

    def describe(self) -> dict:
        info = super().describe()
        info.update({
            "command": getattr(self, "command", None),
            "units": "milliwatts per rail, the instantaneous (first) number of each `NAME cur/avg` field",
            "total_rails": getattr(self, "total_rails", None),
            "timestamps": "host time when each line was read (lags the sensor by up to one period)",
        })
        if self.ram_used_peak_mb is not None:
            info["ram_used_peak_mb"] = self.ram_used_peak_mb
            info["ram_total_mb"] = self.ram_total_mb
        if "covers" in self.config:
            info["total_covers"] = self.config["covers"]
        return info
