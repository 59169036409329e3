"""Sample a power meter in a background thread and integrate it over exactly the timed window.

Energy meters: the cumulative joules are interpolated linearly at the window's start and end (readings bracket the
window because the recorder reads once before and once after it). Power meters: the samples inside the window plus
interpolated end points, integrated with the trapezoid rule. Idle power is measured in its own window by the caller
and reported beside the active figure, never subtracted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading


@dataclass
class WindowEnergy:
    joules: float
    mean_watts: float
    seconds: float
    samples: int  # readings inside the window
    method: str

    def to_json(self) -> dict:
        return {"energy_j": round(self.joules, 6), "mean_power_w": round(self.mean_watts, 4),
                "seconds": round(self.seconds, 6), "samples": self.samples, "method": self.method}


class PowerRecorder:
    """`with PowerRecorder(meter) as rec: ...; rec.window(t0, t1)`. The meter must already be open."""

    def __init__(self, meter: PowerMeter, interval_s: float | None = None):
        self.meter = meter
        self.interval_s = interval_s or meter.interval_s
        self.readings: list[Reading] = []
        self.error: str | None = None  # set when the meter vanished mid-run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        try:
            self.readings.append(self.meter.read())
        except MeterUnavailable as exc:
            self.error = str(exc)
            self._stop.set()

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            self._read()
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def __enter__(self) -> PowerRecorder:
        self._thread = threading.Thread(target=self._loop, name=f"meter-{self.meter.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is None:
            self._read()  # a reading after the window closes, so interpolation brackets its end

    def window(self, t0: float, t1: float) -> WindowEnergy:
        """Energy between monotonic times t0 and t1; raise MeterUnavailable if the readings cannot cover it."""
        if self.error:
            raise MeterUnavailable(f"meter stopped during the run: {self.error}")
        return integrate(self.readings, t0, t1, self.meter.kind)


def _interp(a: Reading, b: Reading, t: float, key: str) -> float:
    va, vb = getattr(a, key), getattr(b, key)
    if b.t == a.t:
        return vb
    return va + (vb - va) * (t - a.t) / (b.t - a.t)


def _at(readings: list[Reading], t: float, key: str) -> float:
    for a, b in zip(readings, readings[1:]):
        if a.t <= t <= b.t:
            return _interp(a, b, t, key)
    raise MeterUnavailable("the meter's readings do not cover the timed window")


def integrate(readings: list[Reading], t0: float, t1: float, kind: str) -> WindowEnergy:
    if t1 <= t0:
        raise ValueError("empty window")
    key = "joules" if kind == "energy" else "watts"
    readings = sorted((r for r in readings if getattr(r, key) is not None), key=lambda r: r.t)
    if len(readings) < 2 or readings[0].t > t0 or readings[-1].t < t1:
        raise MeterUnavailable("the meter's readings do not cover the timed window")
    inside = [r for r in readings if t0 < r.t < t1]
    if kind == "energy":
        joules = _at(readings, t1, key) - _at(readings, t0, key)
        method = "cumulative energy counter, interpolated at the window's ends"
    else:
        points = [(t0, _at(readings, t0, key)), *((r.t, r.watts) for r in inside), (t1, _at(readings, t1, key))]
        joules = sum((tb - ta) * (wa + wb) / 2 for (ta, wa), (tb, wb) in zip(points, points[1:]))
        method = "power samples integrated with the trapezoid rule"
    return WindowEnergy(joules, joules / (t1 - t0), t1 - t0, len(inside), method)
