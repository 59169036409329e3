"""The `nvml` meter against a fake `pynvml` module with the real package's API surface and error classes."""

import importlib.util
import string
import sys
import time
import types

import pytest
from conftest import record_window

from hpqdeploy.device.meters.base import MeterUnavailable, get_meter
from hpqdeploy.device.meters.recorder import PowerRecorder
from hpqdeploy.device.profiles import load_profile
from hpqdeploy.errors import UserError

# nvml.h return codes, as nvidia-ml-py names them (NVML_ERROR_<NAME>) and turns them into NVMLError_<Name> classes.
ERROR_CODES = {"UNINITIALIZED": 1, "INVALID_ARGUMENT": 2, "NOT_SUPPORTED": 3, "NO_PERMISSION": 4,
               "ALREADY_INITIALIZED": 5, "NOT_FOUND": 6, "DRIVER_NOT_LOADED": 9, "LIBRARY_NOT_FOUND": 12,
               "FUNCTION_NOT_FOUND": 13, "GPU_IS_LOST": 15, "LIB_RM_VERSION_MISMATCH": 18, "UNKNOWN": 999}


class FakeGpu:
    def __init__(self, name="NVIDIA A100-SXM4-40GB", energy_mj=5_000_000, app_clocks=(1095, 1215)):
        self.name = name
        self.energy_mj = energy_mj  # int, or a callable returning the counter now
        self.app_clocks = app_clocks  # (graphics, mem) MHz, or None: not supported


def fake_pynvml(gpus: list[FakeGpu], fail: dict[str, str] | None = None, name_bytes=False) -> types.ModuleType:
    """`fail` maps a function name to the NVML_ERROR_ name it raises. Calls are logged in `mod.calls`."""
    mod = types.ModuleType("pynvml")
    mod.calls = []
    mod.initialised = 0
    fail = fail if fail is not None else {}
    mod.fail = fail

    class NVMLError(Exception):
        _valClassMapping: dict = {}

        def __new__(cls, value):
            if cls is NVMLError:
                cls = NVMLError._valClassMapping.get(value, cls)
            obj = Exception.__new__(cls)
            obj.value = value
            return obj

        def __str__(self):
            return mod.nvmlErrorString(self.value)

    mod.NVMLError = NVMLError
    for name, value in ERROR_CODES.items():
        setattr(mod, f"NVML_ERROR_{name}", value)
        cls_name = "NVMLError_" + string.capwords(name, "_").replace("_", "")
        cls = type(cls_name, (NVMLError,), {"__new__": (lambda v: lambda cls: NVMLError.__new__(cls, v))(value)})
        setattr(mod, cls_name, cls)
        NVMLError._valClassMapping[value] = cls
    mod.NVML_CLOCK_GRAPHICS, mod.NVML_CLOCK_SM, mod.NVML_CLOCK_MEM = 0, 1, 2

    def api(fn):
        def wrapped(*args):
            mod.calls.append(fn.__name__)
            if fn.__name__ in fail:
                raise NVMLError(ERROR_CODES[fail[fn.__name__]])
            if fn.__name__ not in ("nvmlInit", "nvmlErrorString") and mod.initialised == 0:
                raise NVMLError(ERROR_CODES["UNINITIALIZED"])
            return fn(*args)
        wrapped.__name__ = fn.__name__
        setattr(mod, fn.__name__, wrapped)
        return wrapped

    @api
    def nvmlErrorString(value):
        return {v: k.replace("_", " ").capitalize() for k, v in ERROR_CODES.items()}.get(value, "Unknown Error")

    @api
    def nvmlInit():
        mod.initialised += 1

    @api
    def nvmlShutdown():
        mod.initialised -= 1

    @api
    def nvmlDeviceGetCount():
        return len(gpus)

    @api
    def nvmlDeviceGetHandleByIndex(index):
        if not 0 <= index < len(gpus):
            raise NVMLError(ERROR_CODES["INVALID_ARGUMENT"])
        return ("handle", index)

    @api
    def nvmlDeviceGetName(handle):
        name = gpus[handle[1]].name
        return name.encode() if name_bytes else name  # nvidia-ml-py < 11.5 returned bytes

    @api
    def nvmlSystemGetDriverVersion():
        return "550.54.15"

    @api
    def nvmlDeviceGetApplicationsClock(handle, clock):
        clocks = gpus[handle[1]].app_clocks
        if clocks is None:
            raise NVMLError(ERROR_CODES["NOT_SUPPORTED"])
        return {mod.NVML_CLOCK_GRAPHICS: clocks[0], mod.NVML_CLOCK_MEM: clocks[1]}[clock]

    @api
    def nvmlDeviceGetTotalEnergyConsumption(handle):
        energy = gpus[handle[1]].energy_mj
        return energy() if callable(energy) else energy

    return mod


@pytest.fixture
def install(monkeypatch):
    def put(*gpus: FakeGpu, **kwargs) -> types.ModuleType:
        mod = fake_pynvml(list(gpus) or [FakeGpu()], **kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod
    return put


def test_fake_errors_behave_like_nvidia_ml_py(install):
    """The fake's error classes must map codes the way the real package does, or the tests below prove nothing."""
    nvml = install()
    assert type(nvml.NVMLError(3)) is nvml.NVMLError_NotSupported
    assert nvml.NVMLError_GpuIsLost().value == 15
    assert issubclass(nvml.NVMLError_LibraryNotFound, nvml.NVMLError)


def test_energy_since_open_in_joules(install):
    gpu = FakeGpu(energy_mj=1_000_000)
    install(gpu)
    meter = get_meter("nvml")
    meter.open()
    gpu.energy_mj = 1_002_500

    reading = meter.read()

    assert reading.joules == 2.5
    assert reading.parts == {"gpu0": 2.5}
    gpu.energy_mj = 1_010_000
    assert meter.read().joules == 10.0


def test_device_index_picks_the_gpu(install):
    gpus = [FakeGpu(name="GPU zero", energy_mj=0), FakeGpu(name="GPU one", energy_mj=7_000)]
    install(*gpus)
    meter = get_meter("nvml", {"device_index": 1})
    meter.open()
    gpus[0].energy_mj, gpus[1].energy_mj = 99_000, 8_000

    assert meter.read().parts == {"gpu1": 1.0}
    assert meter.describe()["gpu"] == "GPU one"


def test_device_index_beyond_the_gpus(install):
    nvml = install(FakeGpu())
    with pytest.raises(MeterUnavailable, match=r"no GPU 2: NVML sees 1 GPU\(s\); set \[meter\] device_index to 0..0"):
        get_meter("nvml", {"device_index": 2}).open()
    assert nvml.initialised == 0  # shut down again


@pytest.mark.parametrize("index", [-1, "0", 1.5, True])
def test_device_index_must_be_an_index(index):
    with pytest.raises(UserError, match="device_index"):
        get_meter("nvml", {"device_index": index})


def test_describe_records_gpu_driver_and_app_clocks(install):
    install(FakeGpu(), name_bytes=True)
    meter = get_meter("nvml", {"interval_ms": 50})
    meter.open()
    info = meter.describe()

    assert info["meter"] == "nvml" and info["kind"] == "energy" and info["interval_ms"] == 50
    assert info["gpu"] == "NVIDIA A100-SXM4-40GB"  # bytes from older bindings are decoded
    assert info["driver_version"] == "550.54.15"
    assert (info["app_clock_graphics_mhz"], info["app_clock_mem_mhz"]) == (1095, 1215)
    assert "millijoules" in info["units"]


def test_describe_after_close_still_names_the_gpu(install):
    """`profile` closes the meter before it writes the result, so describe() must not forget what was measured."""
    install(FakeGpu(name="NVIDIA L4"))
    meter = get_meter("nvml")
    meter.open()
    meter.close()
    assert meter.describe()["gpu"] == "NVIDIA L4"
    with pytest.raises(MeterUnavailable, match="before open"):
        meter.read()


def test_app_clocks_not_supported_are_recorded_as_unknown(install):
    install(FakeGpu(name="NVIDIA GeForce RTX 3090", app_clocks=None))
    meter = get_meter("nvml")
    meter.open()
    info = meter.describe()
    assert info["app_clock_graphics_mhz"] is None and info["app_clock_mem_mhz"] is None
    assert info["gpu"] == "NVIDIA GeForce RTX 3090"


def test_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(MeterUnavailable, match=r"^power: no meter found: nvidia-ml-py is not installed"):
        get_meter("nvml").open()


def test_this_machine_says_why_it_has_no_nvml():
    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("pynvml is installed here; the assertion below is for machines without it")
    meter = get_meter("nvml", load_profile("nvidia-gpu").meter_config)
    with pytest.raises(MeterUnavailable) as info:
        meter.open()
    assert str(info.value).startswith("power: no meter found: nvidia-ml-py is not installed")
    assert "gpu" not in meter.describe()


@pytest.mark.parametrize("error, fragment", [
    ("LIBRARY_NOT_FOUND", "libnvidia-ml.so.1) was not found: install the NVIDIA driver"),
    ("DRIVER_NOT_LOADED", "NVIDIA kernel driver is not loaded"),
    ("LIB_RM_VERSION_MISMATCH", "reboot after the driver upgrade"),
])
def test_no_driver_or_library(install, error, fragment):
    nvml = install(fail={"nvmlInit": error})
    with pytest.raises(MeterUnavailable) as info:
        get_meter("nvml").open()
    assert str(info.value).startswith("power: no meter found: ")
    assert fragment in str(info.value)
    assert "nvmlShutdown" not in nvml.calls  # never initialised, so nothing to shut down


def test_no_energy_counter_before_volta_or_on_jetson(install):
    nvml = install(FakeGpu(name="Tesla P100-PCIE-16GB"), fail={"nvmlDeviceGetTotalEnergyConsumption": "NOT_SUPPORTED"})
    with pytest.raises(MeterUnavailable) as info:
        get_meter("nvml").open()
    message = str(info.value)
    assert message.startswith("power: no meter found: GPU 0 (Tesla P100-PCIE-16GB) has no NVML energy counter")
    assert "Volta" in message and "Jetson" in message and "\n" not in message
    assert nvml.initialised == 0


def test_gpu_lost_mid_run(install):
    nvml = install()
    meter = get_meter("nvml")
    meter.open()
    meter.read()
    nvml.fail["nvmlDeviceGetTotalEnergyConsumption"] = "GPU_IS_LOST"
    with pytest.raises(MeterUnavailable, match="GPU 0 .* is lost .*Xid"):
        meter.read()
    meter.close()
    assert nvml.initialised == 0


def test_other_nvml_errors_keep_nvmls_words(install):
    install(fail={"nvmlDeviceGetName": "UNKNOWN"})
    with pytest.raises(MeterUnavailable, match="^power: NVML nvmlDeviceGetName failed on GPU 0: Unknown$"):
        get_meter("nvml").open()


def test_counter_restart_mid_run_is_not_negative_energy(install):
    gpu = FakeGpu(energy_mj=9_000_000)
    install(gpu)
    meter = get_meter("nvml")
    meter.open()
    gpu.energy_mj = 1_000  # driver reloaded: the counter starts again from zero
    with pytest.raises(MeterUnavailable, match="went backwards .*driver reloaded or the GPU was reset"):
        meter.read()


def test_read_before_open_and_open_close_twice(install):
    nvml = install()
    meter = get_meter("nvml")
    with pytest.raises(MeterUnavailable, match="before open"):
        meter.read()
    meter.open()
    meter.open()  # opening again must not leave a second nvmlInit behind
    meter.close()
    meter.close()
    assert nvml.calls.count("nvmlInit") == 2 and nvml.initialised == 0


def test_recorder_integrates_the_window(install):
    t_base = time.monotonic()
    install(FakeGpu(energy_mj=lambda: int(60_000 * (time.monotonic() - t_base))))  # 60 W
    meter = get_meter("nvml", {"interval_ms": 10})
    meter.open()

    rec, t0, t1 = record_window(meter, 0.15)
    window = rec.window(t0, t1)
    meter.close()

    assert window.joules == pytest.approx(60.0 * (t1 - t0), rel=0.02)
    assert window.mean_watts == pytest.approx(60.0, rel=0.02)
    assert window.samples >= 5


def test_recorder_reports_the_gpu_lost_during_the_window(install):
    nvml = install()
    meter = get_meter("nvml", {"interval_ms": 10})
    meter.open()
    with PowerRecorder(meter) as rec:
        t0 = time.monotonic()
        time.sleep(0.03)
        nvml.fail["nvmlDeviceGetTotalEnergyConsumption"] = "GPU_IS_LOST"
        time.sleep(0.05)
        t1 = time.monotonic()
    with pytest.raises(MeterUnavailable, match="meter stopped during the run: power: GPU 0 .* is lost"):
        rec.window(t0, t1)
