"""Subnormal floats flushed to zero on every thread that computes, not only the one that asked.

Adam drives the moments, and then the weights, of units whose gradient has died into the subnormal range; on Intel
CPUs every operation that touches a subnormal takes a microcode assist. Measured on a Xeon with AMX
(bench/denormal_bench.py): a ResNet-20 step from the state of epoch 5 took 2.4 s instead of 0.19 s, and the run's
epochs had gone from 4.5 to about 20 minutes. Values under 1.2e-38 carry no information here.

The flush mode is a per-thread register (x86 MXCSR FTZ/DAZ, ARM FPCR FZ). `torch.set_flush_denormal` sets the
calling thread's only; OpenMP workers torch has already started keep theirs, so at two threads half of every
parallel op still saw the subnormals. `set_flush` also runs the setting on each thread of the caller's OpenMP team,
through the libgomp torch's own parallel regions run on, and then checks what every thread does.
`subnormals_flushed` is what training uses: flushed for the block, and afterwards as before.
"""

from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

_PROBE_PER_THREAD = 1 << 16  # elements per thread: well above ATen's 32,768-element grain, so every worker gets some
_SUBNORMAL_BITS = 1 << 20  # float32 with a zero exponent and a non-zero mantissa: 1.47e-39


def set_flush(on: bool = True) -> bool:
    """Flush subnormals to zero (`on`) or compute them exactly, on this thread and its OpenMP workers; whether every
    thread now does as asked (False also where the CPU has no flush mode)."""
    if not torch.set_flush_denormal(on):
        return False
    team = _openmp_team_runner()
    if team is not None and torch.get_num_threads() > 1:
        team(lambda: torch.set_flush_denormal(on))
    return flushed_share() == (1.0 if on else 0.0)


def flushed_share() -> float:
    """The share of a parallel op's subnormal inputs the threads computing it treat as zero: 1.0 when every
    thread flushes, 0.0 when none does, in between when only some do."""
    # Made from bit patterns: a float conversion on a flushing thread would already turn the value into zero.
    x = torch.full((_PROBE_PER_THREAD * torch.get_num_threads(),), _SUBNORMAL_BITS, dtype=torch.int32)
    return float(((x.view(torch.float32) * 0.5) == 0).float().mean())


@cache
def _openmp_team_runner():
    """A function running a Python callable once on every thread of the caller's OpenMP team (GOMP_parallel), or
    None when torch's parallel regions do not run on a libgomp found in this process."""
    lib = _torch_libgomp()
    if lib is None:
        return None
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    parallel = lib.GOMP_parallel
    parallel.argtypes = [body_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None

    def run(fn) -> None:
        body = body_type(lambda _: fn())  # kept referenced until GOMP_parallel returns
        parallel(body, None, torch.get_num_threads(), 0)

    return run


def _torch_libgomp() -> ctypes.CDLL | None:
    """The libgomp mapped into this process that torch links: the one in torch's own directory when there is one
    (pip wheels), else the only one mapped (distribution builds, e.g. JetPack's); None when that is ambiguous."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    paths = sorted({line.split()[-1] for line in maps.read_text().splitlines() if "/libgomp" in line})
    torch_dir = str(Path(torch.__file__).resolve().parent)
    own = [p for p in paths if p.startswith(torch_dir)]
    chosen = own or (paths if len(paths) == 1 else [])
    if not chosen:
        return None
    try:
        lib = ctypes.CDLL(chosen[0])
        lib.GOMP_parallel  # noqa: B018 - present since GCC 4.9
    except (OSError, AttributeError):
        return None
    return lib


def flush_subnormals() -> None:
    """`set_flush(True)` for training, warning when some of torch's threads flush and others still do not."""
    if not set_flush(True) and flushed_share() > 0.0:  # 0.0: a CPU without a flush mode, nothing to warn about
        warnings.warn("subnormal floats: some of torch's threads still compute them (their OpenMP runtime could not "
                      "be reached); training may slow down on Intel CPUs; OMP_NUM_THREADS=1 avoids it")


@contextmanager
def subnormals_flushed():
    """Flush subnormals on every thread for the block (a context manager or a decorator); afterwards they are
    computed again if no thread flushed them before."""
    before = flushed_share()
    if before < 1.0:  # nested (finetune inside run_compress): every thread flushes already
        flush_subnormals()
    try:
        yield
    finally:
        if before == 0.0:
            set_flush(False)
