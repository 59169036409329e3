"""What the host CPU's integer dot products do: the one CPU fact lowering decisions depend on."""

from __future__ import annotations

from pathlib import Path

VNNI_FLAGS = {"amx_int8", "avx512_vnni", "avx_vnni"}


def cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def has_vnni(flags: set[str] | None = None) -> bool | None:
    """True with VNNI/AMX (u8 x i8 products summed in int32); False without (x86 kernels then add pairs of products
    in saturating int16: `vpmaddubsw`); None when the flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else bool(flags & VNNI_FLAGS)


def int8_dot_product(flags: set[str] | None = None) -> str:
    vnni = has_vnni(flags)
    if vnni is None:
        return "unknown"
    if vnni:
        return "VNNI/AMX (int32 accumulation)"
    return "no VNNI: u8 x i8 pairs accumulate in saturating int16"


def isa_family(flags: set[str] | None = None) -> str:
    """The family of int8/fp32 kernels x86 runtimes pick on this CPU, as `targets/*.toml` key their measured channel
    multiples: "amx", "vnni" (AVX-512 VNNI or AVX-VNNI), "avx2", "other"; "unknown" when the flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown"
    if "amx_int8" in flags:
        return "amx"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"
