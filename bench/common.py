"""What the bench scripts share: running the CLI as a user would, and writing their section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(args: list[str], log: Path, quiet: bool = True) -> int:
    """`hpqdeploy ARGS` in a process of its own, one thread, output (after the command line) in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write("$ hpqdeploy " + " ".join(args) + "\n")
        fh.flush()
        return subprocess.run([sys.executable, "-m", "hpqdeploy", *args, *(["--quiet"] if quiet else [])],
                              stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **PINNED}, cwd=ROOT).returncode


def results_dir() -> Path:
    """Where results JSON (and each probe's Markdown) go: bench/results, or HPQDEPLOY_BENCH_RESULTS when set (so a
    reduced `run_all.py --quick` run never replaces the committed results)."""
    return Path(os.environ.get("HPQDEPLOY_BENCH_RESULTS") or ROOT / "bench" / "results")


def relink(markdown: str, page_dir: Path) -> str:
    """`markdown` written for a page at the repository root (BENCHMARKS.md), with its relative links made to work
    from a page in `page_dir`."""
    up = Path(os.path.relpath(ROOT, page_dir)).as_posix()
    if up == ".":
        return markdown

    def fix(m: re.Match) -> str:
        return m.group(0) if re.match(r"[a-z]+:|#|/", m.group(1)) else f"]({up}/{m.group(1)})"
    return re.sub(r"\]\(([^)\s]+)\)", fix, markdown)


def replace_section(name: str, heading: str, section: str) -> None:
    """A probe's own Markdown, `NAME.md` beside the results. BENCHMARKS.md is not written here: `run_all.py` composes
    it from the results JSON of the sections it runs."""
    out = results_dir() / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(relink(f"## {heading}\n\n{section}\n", out.parent.resolve()))


def publish(path: Path, blob: dict, name: str, heading: str, section: str) -> None:
    """Write a benchmark's results (`path`, JSON) and its Markdown beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob, indent=2) + "\n")
    replace_section(name, heading, section)
    print(f"wrote {path}")


def cli(args: list[str], log: Path) -> bool:
    rc = run_cli(args, log)
    if rc:
        print(f"failed: {log}")
    return rc == 0


def export(runs: Path, model: str, source: str, runtime: str, mixed: str = "split") -> Path:
    """`hpqdeploy export` of `runs/MODEL/SOURCE` into `runs/export/MODEL/SOURCE-RUNTIME`, unless already there."""
    name = f"{source}-{runtime}" + ("-layer" if mixed == "layer" else "")
    out = runs / "export" / model / name
    if not (out / "export.json").exists():
        cli(["export", str(runs / model / source), "--target", runtime, "--mixed", mixed, "-o", str(out)],
            runs / "logs" / f"export-{model}-{name}.log")
    return out


def round_robin(sessions: dict, inputs, iters: int, repeats: int, warmup: int, shuffle: bool = False
                ) -> dict[str, list[list[float]]]:
    """Seconds per call of every session, called in turn on `inputs` (so all see the same machine state), in
    `repeats` separate passes of `iters` calls each, after `warmup` calls each. `shuffle` calls them in a new
    (seeded) order each round, so no session always runs right after the same other one: a large model run just
    before a small one leaves it cold caches, which at batch 1 is a large part of a call."""
    order = random.Random(0)
    for s in sessions.values():
        for _ in range(warmup):
            s(inputs)
    passes: dict[str, list[list[float]]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k in sessions:
            passes[k].append([])
        for _ in range(iters):
            keys = list(sessions)
            if shuffle:
                order.shuffle(keys)
            for k in keys:
                s = sessions[k]
                t = time.perf_counter()
                s(inputs)
                passes[k][-1].append(time.perf_counter() - t)
    return passes


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")  # what decides which int8 / fp32 kernels the runtimes pick on x86


def machine(packages: tuple[str, ...] = ("torch", "onnxruntime", "openvino", "nncf", "executorch", "torchao")) -> dict:
    """The machine block every result is headed by: CPU model and the ISA flags int8 speed depends on, cores,
    memory, OS, Python and runtime versions, date. Results from different blocks are never compared."""
    import datetime
    import importlib.metadata as md
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    memory = None
    if Path("/proc/meminfo").exists():
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = round(int(total.split()[1]) / 2**20, 1)
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(), "memory_gib": memory,
            "os": platform.platform(), "python": platform.python_version(), "versions": versions,
            "date": datetime.date.today().isoformat()}


def machine_markdown(m: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"Machine: {m['cpu']} ({', '.join(m['isa']) or 'no AVX2'}), {m['cores']} cores, {m['memory_gib']} GiB, "
            f"{m['os']}, Python {m['python']}; {versions}; {m['date']}.")
