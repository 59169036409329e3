"""Tables the CLI prints: the method comparison (also as markdown for the benchmarks), an export, a profile, and
the report's tables (per runtime) as they are in report.md."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

COLUMNS = ("method", "accuracy", "Δacc (pt)", "params", "MACs", "weight bytes", "vs fp32", "low-bit share")


def _rows(results: list[dict]):
    base = next((r for r in results if r["method"] == "baseline"), None)
    for r in results:
        drop = "" if base is None or r is base else f"{100 * (r['accuracy'] - base['accuracy']):+.2f}"
        yield (r["method"], f"{100 * r['accuracy']:.2f}%", drop, f"{r['params']:,}",
               f"{r['macs']:,}" if r.get("macs") else "-", f"{r['bytes']['total']:,}",
               f"1/{r['fp32_bytes'] / r['bytes']['total']:.1f}", f"{r.get('low_bit_share', 0.0):.2f}")


def comparison_table(results: list[dict], title: str = "") -> Table:
    table = Table(title=title or None)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "method" else "right")
    for row in _rows(results):
        table.add_row(*row)
    return table


def comparison_markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines) + "\n"


def export_table(report: dict) -> Table:
    evaluated_in = report.get("session", {}).get("runtime", report["runtime"])
    title = f"{report['method']} → {report['runtime']}"
    if evaluated_in != report["runtime"]:  # TensorRT without a GPU: its Q/DQ graph run in another runtime
        title += f" (evaluated in {evaluated_in}: {report['runtime']} cannot run here)"
    table = Table(title=title)
    for c in (f"accuracy ({evaluated_in})", "accuracy (PyTorch)", "top-1 agreement", "max |Δlogit|", "bytes on disk",
              "legalized"):
        table.add_column(c, justify="right")
    table.add_row(f"{100 * report['accuracy']:.2f}%", f"{100 * report['accuracy_pytorch']:.2f}%",
                  f"{100 * report['top1_agreement']:.2f}%", f"{report['max_abs_diff']:.4g}",
                  f"{report['bytes_on_disk']:,}", str(len(report["legalization"])))
    return table


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def profile_table(result: dict) -> Table:
    lat, energy, mem = result["latency"], result["energy"], result["memory"]
    table = Table(title=f"{result['method']} / {result['runtime']} on {result['device']['kind']} "
                        f"(batch {result['settings']['batch']}, {result['settings']['threads']} thread(s))")
    for c in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "max ms", "inferences/s", "p50 spread",
              "peak RSS MB", "J/inference", "idle W"):
        table.add_column(c, justify="right")
    joules = energy["energy_per_inference_j"]
    idle = energy["idle"].get("mean_power_w")
    rss = mem.get("peak_rss_bytes")
    table.add_row(_ms(lat["p50_ms"]), _ms(lat["p90_ms"]), _ms(lat["p99_ms"]), _ms(lat["mean_ms"]),
                  _ms(lat["min_ms"]), _ms(lat["max_ms"]), f"{lat['throughput_per_s']:.1f}",
                  f"{100 * lat['p50_spread']:.1f}%", "-" if rss is None else f"{rss / 2**20:.0f}",
                  "-" if joules is None else f"{joules:.4g}", "-" if idle is None else f"{idle:.2f}")
    if joules is None:
        table.caption = f"power: {energy['reason']}"
    return table


def report_table(table, title: str = "", sections: bool = False) -> Table:
    """One of the report's text tables (`hpqdeploy.reporting.tables.Table`) for the terminal, its notes below it;
    with `sections`, a line wherever the first column changes."""
    out = Table(title=title or None, caption="\n".join(table.notes) or None, caption_justify="left")
    for i, column in enumerate(table.columns):
        out.add_column(column, justify="left" if table.is_text(i) else "right")
    for row, after in zip(table.rows, [*table.rows[1:], None]):
        out.add_row(*(Text(cell) for cell in row), end_section=sections and after is not None and after[0] != row[0])
    return out


def runtime_tables(models: list[dict]) -> list[Table]:
    """Per model (as report.json holds it): one table, a row per runtime and method, with the accuracy measured
    inside the runtime, the bytes on disk and the latency from the profiles."""
    from hpqdeploy.reporting.tables import runtime_overview

    return [report_table(runtime_overview(m["runtimes"]), f"{m['label']}, per runtime", sections=True)
            for m in models if m["runtimes"]]
