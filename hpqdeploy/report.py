"""The comparison table: baseline, prune-only, quant-only and hybrid side by side."""

from __future__ import annotations

from rich.table import Table

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
    table = Table(title=f"{report['method']} → {report['runtime']}")
    for c in ("accuracy (runtime)", "accuracy (PyTorch)", "top-1 agreement", "max |Δlogit|", "bytes on disk",
              "legalized"):
        table.add_column(c, justify="right")
    table.add_row(f"{100 * report['accuracy']:.2f}%", f"{100 * report['accuracy_pytorch']:.2f}%",
                  f"{100 * report['top1_agreement']:.2f}%", f"{report['max_abs_diff']:.4g}",
                  f"{report['bytes_on_disk']:,}", str(len(report["legalization"])))
    return table
