"""The report page: built once as a list of blocks (headings, paragraphs, lists, tables, images), rendered to
Markdown and to self-contained HTML.

A block is a `Table`, ("h1" | "h2" | "h3" | "p", text), ("list", items) or ("img", file name, alt text).
"""

from __future__ import annotations

import base64
import html as html_lib
import re

from hpqdeploy.reporting.tables import RUNTIME_LEGEND, Table, pytorch_table, runtime_table

RUNTIME_TITLES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "executorch": "ExecuTorch (XNNPACK)",
                  "tensorrt": "TensorRT"}


def document(report: dict, model_blocks: list[list]) -> list:
    """The page for `report` (what report.json holds), each model's plots (`model_blocks`) after its tables."""
    c = report["counts"]
    blocks = [("h1", "hpqdeploy report"),
              ("p", f"From {', '.join(f'`{d}`' for d in report['inputs'])}: {c['compressed']} compressed model(s), "
                    f"{c['exports']} export(s), {c['profiles']} profile(s). Accuracy is on each run's evaluation "
                    "split; \"-\" marks a value no result file holds.")]
    for model, extra in zip(report["models"], model_blocks):
        blocks.append(("h2", model["label"]))
        if model["pytorch"]:
            blocks += [("h3", "PyTorch (compressed model, fake-quantized)"), pytorch_table(model["pytorch"])]
        if model["runtimes"]:
            blocks.append(("p", RUNTIME_LEGEND))
        for runtime, rows in model["runtimes"].items():
            blocks += [("h3", f"{RUNTIME_TITLES.get(runtime, runtime)} (`{runtime}`)"), runtime_table(rows)]
        if not any(r["profiles"] for rows in model["runtimes"].values() for r in rows):
            blocks.append(("p", "No profile.json for this model: latency, throughput and energy are not shown."))
        if extra:
            blocks += [("h3", "Plots")] + extra
    if report["warnings"]:
        blocks += [("h2", "Warnings"), ("list", report["warnings"])]
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.columns)) + " |")
            out.append("|" + "".join(":---|" if b.is_text(i) else "---:|" for i in range(len(b.columns))))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("")
            out += [f"{note}  " for note in b.notes]
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif b[0] == "list":
            out += [f"- {item}" for item in b[1]]
        elif b[0] == "p":
            out.append(b[1])
        else:
            out.append({"h1": "#", "h2": "##", "h3": "###"}[b[0]] + " " + b[1])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1500px;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fafafa}
p.note{font-size:12px;color:#555;margin:.2em 0}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
code{background:#f3f3f3;padding:0 3px}"""


def _inline(text: str) -> str:
    """Escaped, with `code` spans kept."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html_lib.escape(text))


def render_html(blocks: list, images: dict[str, bytes], title: str) -> str:
    """One self-contained page: `images` (file name -> PNG bytes) inlined as base64."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html_lib.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Table):
            out.append("<table><thead><tr>" + "".join(f"<th>{html_lib.escape(c)}</th>" for c in b.columns)
                       + "</tr></thead><tbody>")
            for row in b.rows:
                out.append("<tr>" + "".join(f"<td>{html_lib.escape(c)}</td>" if b.is_text(i) else
                                            f"<td class='n'>{html_lib.escape(c)}</td>" for i, c in enumerate(row))
                           + "</tr>")
            out.append("</tbody></table>")
            out += [f"<p class='note'>{_inline(n)}</p>" for n in b.notes]
        elif b[0] == "img":
            data = base64.b64encode(images[b[1]]).decode("ascii")
            out.append(f"<p><img alt='{html_lib.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
        elif b[0] == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        else:
            out.append(f"<{b[0]}>{_inline(b[1])}</{b[0]}>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
