"""The plots one model gets: accuracy vs bytes, accuracy vs latency per device and batch size, and each hybrid plan
per layer. Picks the data from the rows and plans; `plots` draws it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hpqdeploy.reporting import plots
from hpqdeploy.reporting.groups import Group, file_safe
from hpqdeploy.reporting.rows import latency_keys, profile_key
from hpqdeploy.reporting.tables import fmt_ratio, fmt_si, key_label


def layer_rows(plan: dict, reference: dict | None) -> list[plots.LayerRow]:
    """One row per quantized layer of `plan`: kept and original output channels, channels per bit width, and the
    sensitivities. The original count comes from an unpruned plan of the same model (`reference`, a quant-only
    run) when there is one, else from the pruning group the layer is named after; otherwise it stays unknown."""
    groups = plan.get("pruning") or []
    ref_layers = (reference or {}).get("quantization") or {}
    sens = plan.get("layer_sensitivity") or {}
    rows = []
    for name, q in (plan.get("quantization") or {}).items():
        kept = int(q.get("out_channels", 0))
        original, group_sens = None, None
        for g in groups:
            if name == g["name"] or name.startswith(g["name"] + "."):
                unit = g.get("unit_channels", 1)
                if g["kept"] * unit == kept:
                    original, group_sens = g["units"] * unit, g.get("sensitivity")
                    break
        if name in ref_layers:
            original = int(ref_layers[name]["out_channels"])
        elif original is None and not groups:
            original = kept  # nothing was pruned
        bits = Counter()
        for run in q.get("bits") or []:
            bits[int(run["bits"])] += len(run.get("channels") or [])
        rows.append(plots.LayerRow(name, kept, original, dict(bits), q.get("sensitivity", sens.get(name)),
                                   group_sens))
    return rows


def _points(rows: list[dict], x_of) -> list[tuple[dict, plots.Point]]:
    pts = []
    for r in rows:
        x, acc = x_of(r), r.get("accuracy_runtime", r.get("accuracy"))
        if x and acc is not None:
            variant = ", ".join(v.removeprefix("mixed=") for v in r.get("variant", "").split(", ") if v)
            label = r["run"] + (f" {variant}" if variant else "")
            pts.append((r, plots.Point(float(x), float(acc), label, r.get("runtime", "pytorch"), r["method"] or "?")))
    return pts


def _front_ids(pts: list[tuple[dict, plots.Point]]) -> list[str]:
    return [pts[i][0]["id"] for i in plots.pareto_front([(p.x, p.accuracy) for _, p in pts])]


def _p50(row: dict, key: tuple) -> float | None:
    return next((p["p50_ms"] for p in row["profiles"] if profile_key(p) == key), None)


def _hybrid_subtitle(m: dict, with_reference: bool) -> str:
    return ", ".join(s for s in (
        f"params {fmt_si(m.get('params'))} of {fmt_si((m.get('baseline') or {}).get('params'))}"
        if m.get("params") else "",
        f"low-bit share {100 * m['low_bit_share']:.0f}%" if m.get("low_bit_share") is not None else "",
        f"weights {fmt_ratio(m.get('compression'))} smaller than fp32" if m.get("compression") else "",
        "original channels from the quant-only plan" if with_reference else "") if s)


def draw_model_plots(g: Group, model: dict, work: Path) -> list:
    """The model's PNGs into `work`; returns report blocks that embed them and records the files and Pareto fronts
    in `model`."""
    blocks, files, fronts = [], {}, {}
    export_rows = [r for rows in model["runtimes"].values() for r in rows]
    if export_rows:
        pts = _points(export_rows, lambda r: r["bytes_on_disk"])
        xlabel, what = "artifact size on disk", "exported artifacts, accuracy measured in the runtime"
    else:
        pts = _points(model["pytorch"], lambda r: r["weight_bytes"])
        xlabel, what = "weight bytes at the plan's bit widths", "PyTorch (no exports found)"
    if pts:
        name = f"{g.slug}-accuracy-vs-bytes.png"
        plots.plot_tradeoff([(what, [p for _, p in pts])], work / name, f"{g.label}: accuracy vs size", xlabel)
        files["accuracy_vs_bytes"], fronts["bytes"] = name, _front_ids(pts)
        blocks.append(("img", name, f"{g.label}: accuracy vs bytes"))

    panels, fronts["latency"] = [], {}
    keys = latency_keys(export_rows)
    for key in keys:
        pts = _points(export_rows, lambda r, key=key: _p50(r, key))
        if pts:
            lab = key_label(key, keys)
            panels.append((f"{lab}: p50 latency per call, batch {key[1]}", [p for _, p in pts]))
            fronts["latency"][lab] = _front_ids(pts)
    if panels:
        name = f"{g.slug}-accuracy-vs-latency.png"
        plots.plot_tradeoff(panels, work / name, f"{g.label}: accuracy vs latency (profile.json)",
                            "p50 latency per call (ms)", x_format="ms")
        files["accuracy_vs_latency"] = name
        blocks.append(("img", name, f"{g.label}: accuracy vs latency"))

    reference = next((c.plan for c in g.compressed if not c.plan.get("pruning") and c.plan.get("quantization")),
                     None)
    for c in g.compressed:
        if c.method != "hybrid" or not c.plan.get("quantization"):
            continue
        name = f"{g.slug}-{file_safe(c.label)}-layers.png"
        plots.plot_layers(layer_rows(c.plan, reference), work / name,
                          f"{g.label} · {c.label}: the hybrid plan per layer",
                          _hybrid_subtitle(c.metrics, reference is not None))
        files.setdefault("layers", {})[c.label] = name
        blocks.append(("img", name, f"{g.label} {c.label}: plan per layer"))
    model["plots"], model["pareto"] = files, fronts
    return blocks
