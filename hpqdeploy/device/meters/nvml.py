"""NVIDIA GPU board energy from NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, Volta+).

The counter is in millijoules since the driver was loaded, 64 bits wide, so it does not wrap; it does restart if
the driver reloads or the GPU resets, which is reported as the meter vanishing rather than corrected. `pynvml`
comes from the `nvidia-ml-py` package and is imported only when the meter is opened.
"""

from __future__ import annotations

import importlib
import time

from hpqdeploy.device.meters.base import MeterUnavailable, PowerMeter, Reading, register_meter
from hpqdeploy.errors import UserError

ENERGY_CALL = "nvmlDeviceGetTotalEnergyConsumption"
NOT_INSTALLED = "power: no meter found: nvidia-ml-py is not installed (pip install nvidia-ml-py; it provides pynvml)"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@register_meter("nvml")
class NvmlMeter(PowerMeter):
    kind = "energy"

    def __init__(self, config: dict | None = None):
        super().__init__(config)
        index = self.config.get("device_index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise UserError(f"nvml meter: device_index must be a GPU index (0, 1, ...), not {index!r}")
        self.device_index = index
        self._nvml = None  # the pynvml module while NVML is initialised
        self._handle = None
        self._start_mj = self._last_mj = 0
        self._info: dict = {}

    def _reason(self, exc: Exception, doing: str) -> str:
        """One line a person can act on, from the NVMLError subclass (pynvml names one per NVML_ERROR_* code)."""
        gpu = f"GPU {self.device_index}" + (f" ({self._info['gpu']})" if "gpu" in self._info else "")
        kind = type(exc).__name__
        try:
            detail = str(exc)
        except Exception:  # noqa: BLE001 - str() of an NVMLError calls into the library, which may be gone
            detail = f"NVML error code {getattr(exc, 'value', '?')}"
        if kind == "NVMLError_LibraryNotFound":
            return ("power: no meter found: the NVML library (libnvidia-ml.so.1) was not found: install the NVIDIA "
                    "driver, or run on a machine with an NVIDIA GPU")
        if kind == "NVMLError_DriverNotLoaded":
            return ("power: no meter found: the NVIDIA kernel driver is not loaded (nvidia-smi fails too): "
                    "load it (modprobe nvidia) or reboot after installing the driver")
        if kind == "NVMLError_LibRmVersionMismatch":
            return ("power: no meter found: NVML and the loaded NVIDIA driver differ in version: reboot after the "
                    "driver upgrade")
        if kind == "NVMLError_NotSupported" and doing == ENERGY_CALL:
            return (f"power: no meter found: {gpu} has no NVML energy counter ({doing} needs a Volta or newer GPU; "
                    f"on Jetson NVML reports no power: use the board's INA3221 rails)")
        if kind == "NVMLError_NotSupported":
            return f"power: no meter found: NVML does not support {doing} on {gpu}"
        if kind == "NVMLError_NoPermission":
            return f"power: NVML denied {doing} on {gpu}: run as a user allowed to query the GPU ({detail})"
        if kind == "NVMLError_GpuIsLost":
            return (f"power: {gpu} is lost (fell off the bus or stopped answering) during {doing}: check dmesg for "
                    f"Xid errors; the GPU needs a reset or a reboot")
        return f"power: NVML {doing} failed on {gpu}: {detail}"

    def _call(self, doing: str, fn, *args):
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            raise MeterUnavailable(self._reason(exc, doing)) from None

    def open(self) -> None:
        self.close()  # nvmlInit is reference-counted: a second open() must not leave NVML initialised
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            raise MeterUnavailable(NOT_INSTALLED) from None
        self._info = {}
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise MeterUnavailable(self._reason(exc, "nvmlInit")) from None
        self._nvml = nvml
        try:
            count = self._call("nvmlDeviceGetCount", nvml.nvmlDeviceGetCount)
            if self.device_index >= count:
                raise MeterUnavailable(f"power: no meter found: no GPU {self.device_index}: NVML sees {count} "
                                       f"GPU(s); set [meter] device_index to 0..{count - 1}")
            self._handle = self._call("nvmlDeviceGetHandleByIndex", nvml.nvmlDeviceGetHandleByIndex,
                                      self.device_index)
            self._info = self._device_info()
            self._start_mj = self._last_mj = self._energy_mj()
        except MeterUnavailable:
            self.close()
            raise

    def _device_info(self) -> dict:
        nvml, handle = self._nvml, self._handle
        info = {"gpu": _text(self._call("nvmlDeviceGetName", nvml.nvmlDeviceGetName, handle)),
                "driver_version": _text(self._call("nvmlSystemGetDriverVersion", nvml.nvmlSystemGetDriverVersion))}
        for label, clock in (("app_clock_graphics_mhz", "NVML_CLOCK_GRAPHICS"),
                             ("app_clock_mem_mhz", "NVML_CLOCK_MEM")):
            try:
                info[label] = nvml.nvmlDeviceGetApplicationsClock(handle, getattr(nvml, clock))
            except nvml.NVMLError:  # not supported on many boards (GeForce, Jetson): recorded as unknown
                info[label] = None
        return info

    def _energy_mj(self) -> int:
        return self._call(ENERGY_CALL, self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)

    def read(self) -> Reading:
        if self._nvml is None:
            raise MeterUnavailable("power: the nvml meter was read before open() or after close()")
        start = time.monotonic()
        mj = self._energy_mj()
        t = (start + time.monotonic()) / 2
        if mj < self._last_mj:
            raise MeterUnavailable(f"power: GPU {self.device_index}'s energy counter went backwards ({self._last_mj} "
                                   f"-> {mj} mJ): the driver reloaded or the GPU was reset during the run")
        self._last_mj = mj
        joules = (mj - self._start_mj) / 1000
        return Reading(t=t, joules=joules, parts={f"gpu{self.device_index}": joules})

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass  # shutting down a lost GPU's library can fail; nothing is left to release
        self._nvml = self._handle = None

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device_index": self.device_index,
            **self._info,
            "units": "nvmlDeviceGetTotalEnergyConsumption: millijoules since driver load; reported in joules "
                     "since open()",
            "total_covers": "the GPU board as its power sensor sees it (not the host CPU or DRAM)",
        }
