"""`hpqdeploy report DIR... -o OUT`: every result under the given directories, linked, compared and drawn.

Reads what the other commands wrote: `train`/`compress` (metrics.json + plan.json), `export` (export.json) and
`profile` (profile.json), in the given directories or anywhere below them. An export is linked to its compressed
model by its `source`, a profile to its export by its `artifact`; results are grouped by model (the plan's model
spec and data set) and method (baseline, prune, quant, hybrid). OUT receives

    report.md     one table per runtime (accuracy in the runtime and in PyTorch, size, compression, latency and
                  throughput per batch size, energy or why it is missing, what legalization changed), the PNGs
                  embedded by relative path
    report.json   everything the tables show, unformatted, for machines
    *.png         accuracy vs bytes, accuracy vs latency (Pareto front marked), the hybrid plan per layer
    report.html   with html=True: the same page, self-contained (PNGs inlined as base64)

Nothing is estimated: a value no result file holds is "-", a missing energy figure carries the profile's reason.
OUT is written as OUT.partial and renamed when complete.

    collect      find, read and link the result directories
    groups       group them by model
    rows         the comparison rows (what report.json holds)
    tables       the rows as text tables
    model_plots  which plots a model gets; plots draws them
    render       the page, to Markdown and HTML
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from hpqdeploy import atomic
from hpqdeploy.reporting.collect import discover, link
from hpqdeploy.reporting.groups import Group, group
from hpqdeploy.reporting.model_plots import draw_model_plots
from hpqdeploy.reporting.plots import require_matplotlib
from hpqdeploy.reporting.render import document, render_html, render_markdown
from hpqdeploy.reporting.rows import attach_profiles, pytorch_row, runtime_rows

__all__ = ["comparison", "run_report"]

FORMAT_VERSION = 1


def _report_data(dirs: list[Path]) -> tuple[dict, list[Group]]:
    """Everything the report shows, as the dict written to report.json (without plot files yet)."""
    found = discover(dirs)
    export_source, profile_export = link(found)
    profiles_by_export, warnings = attach_profiles(found, profile_export)
    groups = group(found, export_source)
    models = [{"model": g.name, "data": g.data, "label": g.label,
               "pytorch": [pytorch_row(c, found.compressed.get(c.baseline)) for c in g.compressed],
               "runtimes": runtime_rows(g, profiles_by_export)} for g in groups]
    report = {
        "format": FORMAT_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(d) for d in dirs],
        "counts": {"compressed": len(found.compressed), "exports": len(found.exported),
                   "profiles": len(found.profiled)},
        "models": models, "warnings": found.warnings + warnings,
    }
    return report, groups


def comparison(dirs: list[Path]) -> dict:
    """What report.json holds for the results under `dirs` (without the plots): per model, the PyTorch rows and the
    rows per runtime with their profiles."""
    return _report_data(dirs)[0]


def run_report(dirs: list[Path], out: Path, html: bool = False) -> dict:
    """Collect every result under `dirs` and write report.md, report.json and the PNGs (and report.html when
    `html`) into `out`, atomically. Returns what report.json holds."""
    out = Path(out)
    atomic.check_output(out)
    require_matplotlib()
    report, groups = _report_data(dirs)
    with atomic.directory(out) as work:
        model_blocks = [draw_model_plots(g, m, work) for g, m in zip(groups, report["models"])]
        blocks = document(report, model_blocks)
        (work / "report.md").write_text(render_markdown(blocks))
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if html:
            images = {p.name: p.read_bytes() for p in work.glob("*.png")}
            (work / "report.html").write_text(render_html(blocks, images, "hpqdeploy report"))
    return report
