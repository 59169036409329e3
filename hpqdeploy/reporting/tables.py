"""The comparison rows as tables of text: one for PyTorch, one per runtime with latency and energy per device and
batch size. A missing value is "-", a missing energy figure points to the profile's reason in a note."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpqdeploy.reporting.plots import human_bytes
from hpqdeploy.reporting.rows import latency_keys, profile_key

RUNTIME_LEGEND = ("acc (runtime): the artifact evaluated inside its runtime (export.json); acc (PyTorch): the "
                  "compressed model in PyTorch (metrics.json). bytes on disk: the artifact's files; plan weight "
                  "bytes: the plan's estimate (metrics.json); vs fp32 weights: the fp32 model's weight bytes, and vs "
                  "baseline export: this runtime's baseline artifact, each divided by bytes on disk. Latency per call "
                  "and energy per inference from profile.json, per device and batch size (b1 = batch 1).")


def fmt_si(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:,}"


def fmt_bytes(n) -> str:
    return "-" if n is None else human_bytes(n)


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}×"


def fmt_num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    text: tuple[str, ...] = ("method", "run", "legalization")  # left-aligned columns; the rest are numbers

    def is_text(self, i: int) -> bool:
        return self.columns[i] in self.text


def pytorch_table(rows: list[dict]) -> Table:
    cols = ["method", "run", "accuracy", "Δacc (pt)", "params", "MACs", "weight bytes", "vs fp32", "low-bit share"]
    body = [[r["method"] or "-", r["run"], fmt_pct(r["accuracy"]),
             "-" if r["accuracy_delta_points"] is None else f"{r['accuracy_delta_points']:+.2f}", fmt_si(r["params"]),
             fmt_si(r["macs"]), fmt_bytes(r["weight_bytes"]), fmt_ratio(r["compression_vs_fp32"]),
             "-" if r["low_bit_share"] is None else f"{100 * r['low_bit_share']:.0f}%"] for r in rows]
    return Table(cols, body, ["weight bytes: at the plan's bit widths plus scales, everything else fp32 "
                              "(metrics.json); vs fp32: the fp32 model's weight bytes divided by them"])


def key_label(key: tuple, keys: list[tuple]) -> str:
    """A column's device and batch ("x86 b8"), with the thread count only when the keys differ in it."""
    device, batch, threads = key
    label = f"{device} b{batch}"
    if len({k[2] for k in keys}) > 1:
        label += f" t{threads}"
    return label


def runtime_table(rows: list[dict]) -> Table:
    keys = latency_keys(rows)
    cols = ["method", "run", "acc (runtime)", "acc (PyTorch)", "params", "MACs", "bytes on disk",
            "plan weight bytes", "vs fp32 weights", "vs baseline export"]
    for k in keys:
        lab = key_label(k, keys)
        cols += [f"p50 ms {lab}", f"p99 ms {lab}", f"inf/s {lab}", f"mJ/inf {lab}"]
    cols.append("legalization")
    reasons: dict[str, int] = {}
    body = []
    for r in rows:
        run = r["run"] + (f" ({r['variant']})" if r["variant"] else "")
        cells = [r["method"] or "-", run, fmt_pct(r["accuracy_runtime"]), fmt_pct(r["accuracy_pytorch"]),
                 fmt_si(r["params"]), fmt_si(r["macs"]), fmt_bytes(r["bytes_on_disk"]),
                 fmt_bytes(r["plan_weight_bytes"]), fmt_ratio(r["compression_vs_fp32"]),
                 fmt_ratio(r["compression_vs_baseline_export"])]
        by_key = {profile_key(p): p for p in r["profiles"]}
        for k in keys:
            p = by_key.get(k)
            if p is None:
                cells += ["-"] * 4
                continue
            if p["energy_per_inference_j"] is not None:
                energy = f"{1e3 * p['energy_per_inference_j']:.4g}"
            else:
                n = reasons.setdefault(p["energy_reason"], len(reasons) + 1)
                energy = f"- [{n}]"
            cells += [fmt_num(p["p50_ms"]), fmt_num(p["p99_ms"]), fmt_num(p["throughput_per_s"]), energy]
        leg = r["legalization"]
        cells.append(f"{leg['count']}: {leg['summary']}" if leg["count"] else "0")
        body.append(cells)
    return Table(cols, body, [f"[{n}] energy not measured: {reason}" for reason, n in reasons.items()])


def runtime_overview(runtimes: dict[str, list[dict]]) -> Table:
    """All runtimes of one model in one table: a row per runtime and export, with the accuracy measured inside the
    runtime (and in PyTorch), the artifact's bytes on disk and the median latency per profiled device and batch."""
    rows = [r for runtime_rows in runtimes.values() for r in runtime_rows]
    keys = latency_keys(rows)
    cols = ["runtime", "method", "acc (runtime)", "acc (PyTorch)", "bytes on disk", "vs fp32 weights",
            *(f"p50 ms {key_label(k, keys)}" for k in keys)]
    body = []
    for r in rows:
        method = r["method"] or "-"
        if r["run"] != method:
            method += f" ({r['run']})"
        if r["variant"]:
            method += f" [{r['variant']}]"
        by_key = {profile_key(p): p for p in r["profiles"]}
        body.append([r["runtime"], method, fmt_pct(r["accuracy_runtime"]), fmt_pct(r["accuracy_pytorch"]),
                     fmt_bytes(r["bytes_on_disk"]), fmt_ratio(r["compression_vs_fp32"]),
                     *(fmt_num(by_key[k]["p50_ms"]) if k in by_key else "-" for k in keys)])
    notes = [] if keys else ["no profile.json for these exports: no latency"]
    return Table(cols, body, notes, text=("runtime", "method"))
