"""What a runner is: it prepares an exported artifact on the device and returns per-inference times.

Local runners time each call in this process. Runners that drive another device (Android over adb) time on the
device and return its numbers; either way `Timing.t0`/`t1` is the host's `time.monotonic()` window in which the
timed inferences ran, which is the window the power recorder integrates over.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from hpqdeploy.registry import Registry


class RunnerUnavailable(Exception):
    """The runner cannot run here (package missing, no GPU, no device attached): the message says why."""


@dataclass
class Timing:
    times_ms: list[float]  # one entry per timed call (each call runs `batch` inferences)
    t0: float  # host monotonic seconds: start of the timed window
    t1: float  # end of the timed window
    batch: int
    notes: list[str] = field(default_factory=list)
    window_covers: str = "timed calls only"  # what else the window holds, when a runner cannot separate it

    @property
    def inferences(self) -> int:
        return len(self.times_ms) * self.batch


@dataclass
class RunSettings:
    batch: int = 1
    threads: int = 1
    warmup: int = 20
    iters: int = 200
    min_seconds: float = 0.0  # keep going until both `iters` calls and `min_seconds` have passed
    warmup_seconds: float = 0.0  # keep warming up until both `warmup` calls and `warmup_seconds` have passed


def calls_covering(calls: int, seconds: float, per_call_ms: float | None) -> int:
    """For a runner that fixes its call count before it starts (`warmup`/`warmup_seconds`, `iters`/`min_seconds`):
    `calls`, or as many calls as last `seconds` at `per_call_ms` (the time per call seen so far), whichever is more."""
    if seconds <= 0 or not per_call_ms:
        return calls
    return max(calls, math.ceil(seconds * 1e3 / per_call_ms))


class Runner(ABC):
    name: str
    runtime: str  # the export runtime whose artifacts it runs

    def __init__(self, profile_extra: dict | None = None):
        self.profile_extra = dict(profile_extra or {})

    @abstractmethod
    def prepare(self, artifact_dir: Path, inputs, settings: RunSettings) -> None:
        """Load the artifact (push it to the device); `inputs` is one batch as numpy (array or dict of arrays)."""

    @abstractmethod
    def run(self, settings: RunSettings) -> Timing:
        """Warm up (`warmup` calls and at least `warmup_seconds`), then time `settings.iters` calls (and at least
        `min_seconds`)."""

    def memory(self) -> dict:
        """Peak memory of the inference process, or a reason it was not measured."""
        return {"peak_rss_bytes": None, "reason": f"{self.name} does not report memory"}

    def info(self) -> dict:
        """Runtime versions and settings in effect."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional
        pass


RUNNERS: Registry[type[Runner]] = Registry("runner", "hpqdeploy.device.runners")
register_runner = RUNNERS.register
runner_names = RUNNERS.names


def get_runner(name: str, profile_extra: dict | None = None) -> Runner:
    return RUNNERS.get(name, profile_extra)
