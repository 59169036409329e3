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
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hpqdeploy.errors import UserError

FORMAT_VERSION = 1
METHOD_ORDER = ("baseline", "prune", "quant", "hybrid")
RUNTIME_ORDER = ("onnxruntime", "openvino", "executorch", "tensorrt")
RUNTIME_TITLES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "executorch": "ExecuTorch (XNNPACK)",
                  "tensorrt": "TensorRT"}
INPUT_KINDS = "metrics.json + plan.json (train/compress), export.json (export) or profile.json (profile)"


# ---------------------------------------------------------------------------------------------------------------
# Finding the result files


@dataclass
class Compressed:
    """A `train` or `compress` output directory."""

    path: Path
    metrics: dict
    plan: dict
    provenance: dict = field(default_factory=dict)
    label: str = ""  # the directory's name, with as many parents as it takes to tell two runs of one model apart
    baseline: Path | None = None  # the baseline run it was compressed from (provenance.json), when among the results

    @property
    def method(self) -> str | None:
        return self.metrics.get("method") or self.plan.get("method")


@dataclass
class Exported:
    path: Path
    meta: dict


@dataclass
class Profiled:
    path: Path
    result: dict


@dataclass
class Found:
    compressed: dict[Path, Compressed] = field(default_factory=dict)
    exported: dict[Path, Exported] = field(default_factory=dict)
    profiled: dict[Path, Profiled] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        blob = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run the command that wrote it") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror})") from None
    if not isinstance(blob, dict):
        raise UserError(f"{path} holds a JSON {type(blob).__name__}, not the object hpqdeploy writes")
    return blob


def _read_dir(path: Path, files: set[str], found: Found) -> bool:
    """Record the results `path` holds; False when it holds none."""
    hit = False
    key = path.resolve()
    if "metrics.json" in files and "plan.json" in files:
        if key not in found.compressed:
            found.compressed[key] = _compressed(key)
        hit = True
    elif "metrics.json" in files or "plan.json" in files:
        have = "metrics.json" if "metrics.json" in files else "plan.json"
        found.warnings.append(f"{path} has {have} but not its partner: skipped (an incomplete train/compress run?)")
    if "export.json" in files:
        found.exported.setdefault(key, Exported(key, _read_json(path / "export.json")))
        hit = True
    if "profile.json" in files:
        found.profiled.setdefault(key, Profiled(key, _read_json(path / "profile.json")))
        hit = True
    return hit


def _compressed(path: Path) -> Compressed:
    prov = path / "provenance.json"
    return Compressed(path, _read_json(path / "metrics.json"), _read_json(path / "plan.json"),
                      _read_json(prov) if prov.is_file() else {})


def discover(dirs: list[Path]) -> Found:
    """Every result directory in `dirs` and below them (`*.partial` work directories skipped)."""
    if not dirs:
        raise UserError("report needs at least one directory: the output of train, compress, export or profile")
    found = Found()
    for d in map(Path, dirs):
        if not d.exists():
            raise UserError(f"{d} does not exist: pass directories written by train, compress, export or profile "
                            "(or a directory holding them)")
        if not d.is_dir():
            raise UserError(f"{d} is a file: pass the directory that holds it")
        hits = 0
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not n.endswith(".partial") and n != "tokenizer")
            hits += _read_dir(Path(dirpath), set(filenames), found)
        if not hits:
            raise UserError(f"{d} holds no {INPUT_KINDS}, nor does any directory below it")
    return found


def _locate(recorded: str | None, known: dict[Path, object]) -> Path | None:
    """The known directory a recorded path names: the same directory, or (for a tree that moved or a path recorded
    relative to another working directory) the only one whose trailing path components match, at least two."""
    if not recorded:
        return None
    p = Path(recorded)
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p]):
        resolved = candidate.resolve()
        if resolved in known:
            return resolved
    best, best_n = [], 0
    for k in known:
        n = 0
        while n < min(len(k.parts), len(p.parts)) and k.parts[-1 - n] == p.parts[-1 - n]:
            n += 1
        if n > best_n:
            best, best_n = [k], n
        elif n == best_n and n:
            best.append(k)
    return best[0] if best_n >= 2 and len(best) == 1 else None


def _on_disk(recorded: str | None, marker: str) -> Path | None:
    if not recorded:
        return None
    p = Path(recorded)
    p = p if p.is_absolute() else Path.cwd() / p
    return p.resolve() if (p / marker).is_file() else None


def link(found: Found) -> tuple[dict[Path, Path | None], dict[Path, Path | None]]:
    """export dir -> compress dir, profile dir -> export dir. A source named by a result but not among the inputs is
    read from where it was recorded when it is still there."""
    export_source, profile_export = {}, {}
    for pdir, prof in sorted(found.profiled.items()):
        target = _locate(prof.result.get("artifact"), found.exported)
        if target is None and (disk := _on_disk(prof.result.get("artifact"), "export.json")):
            found.exported[disk] = Exported(disk, _read_json(disk / "export.json"))
            target = disk
        if target is None:
            found.warnings.append(f"profile {pdir}: its export {prof.result.get('artifact')} is neither among the "
                                  "inputs nor on disk; left out")
        profile_export[pdir] = target
    for edir, exp in sorted(found.exported.items()):
        source = _locate(exp.meta.get("source"), found.compressed)
        if source is None and (disk := _on_disk(exp.meta.get("source"), "plan.json")) and \
                (disk / "metrics.json").is_file():
            found.compressed[disk] = _compressed(disk)
            source = disk
        if source is None:
            found.warnings.append(f"export {edir}: its source {exp.meta.get('source')} is neither among the inputs "
                                  "nor on disk; PyTorch figures for it are missing")
        export_source[edir] = source
    for c in found.compressed.values():
        c.baseline = c.path if c.method == "baseline" else _locate(c.provenance.get("baseline"), found.compressed)
    return export_source, profile_export


# ---------------------------------------------------------------------------------------------------------------
# Rows


def _model_of(plan: dict) -> tuple[str, str]:
    spec = plan.get("model") or {}
    name = str(spec.get("name", "unknown model"))
    if "/" in name or os.sep in name:
        name = Path(name).name
    return f"{spec.get('family', '?')}:{name}", name


def _sort_method(method: str | None) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method or "")


def _sort_runtime(runtime: str) -> tuple:
    return (RUNTIME_ORDER.index(runtime) if runtime in RUNTIME_ORDER else len(RUNTIME_ORDER), runtime)


def legalization_summary(changes: list[dict]) -> dict:
    """Count and a short text by kind: "weight bits ×40 → 8-bit; layout ×1"."""
    kinds = Counter(c.get("what", "?") for c in changes)
    parts = []
    for what, n in kinds.most_common():
        afters = {c.get("after") for c in changes if c.get("what", "?") == what}
        after = next(iter(afters)) if len(afters) == 1 else None
        parts.append(f"{what} ×{n}" + (f" → {after}" if after and len(str(after)) <= 24 else ""))
    return {"count": len(changes), "by_kind": dict(kinds.most_common()), "summary": "; ".join(parts)}


def _profile_summary(path: Path, result: dict) -> dict:
    lat = result.get("latency") or {}
    energy = result.get("energy") or {}
    settings = result.get("settings") or {}
    joules = energy.get("energy_per_inference_j")
    return {
        "path": str(path), "device": (result.get("device") or {}).get("kind"), "batch": settings.get("batch"),
        "threads": settings.get("threads"), "runner": (result.get("runner") or {}).get("name"),
        "p50_ms": lat.get("p50_ms"), "p90_ms": lat.get("p90_ms"), "p99_ms": lat.get("p99_ms"),
        "throughput_per_s": lat.get("throughput_per_s"), "p50_spread": lat.get("p50_spread"),
        "energy_per_inference_j": joules,
        "energy_reason": None if joules is not None else (energy.get("reason") or "not recorded in profile.json"),
        "idle_power_w": (energy.get("idle") or {}).get("mean_power_w"),
        "peak_rss_bytes": (result.get("memory") or {}).get("peak_rss_bytes"),
    }


def _pytorch_row(c: Compressed, baseline: Compressed | None) -> dict:
    m = c.metrics
    bytes_total = (m.get("bytes") or {}).get("total")
    base_acc = (m.get("baseline") or {}).get("accuracy")
    if base_acc is None and baseline is not None and baseline is not c:
        base_acc = baseline.metrics.get("accuracy")
    method = c.method
    acc = m.get("accuracy")
    fp32 = m.get("fp32_bytes")
    return {
        "id": c.label, "method": method, "run": c.label, "path": str(c.path),
        "accuracy": acc, "accuracy_delta_points": None if method == "baseline" or base_acc is None or acc is None
        else 100 * (acc - base_acc),
        "params": m.get("params"), "macs": m.get("macs"), "weight_bytes": bytes_total, "fp32_bytes": fp32,
        "compression_vs_fp32": m.get("compression", fp32 / bytes_total if fp32 and bytes_total else None),
        "low_bit_share": m.get("low_bit_share"), "target": c.plan.get("target"),
    }


@dataclass
class Group:
    key: str
    name: str
    data: str | None
    compressed: list[Compressed] = field(default_factory=list)
    exports: list[tuple[Exported, Compressed | None]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} on {self.data}" if self.data else self.name

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label).strip("-").lower()


def group(found: Found, export_source: dict[Path, Path | None]) -> list[Group]:
    groups: dict[str, Group] = {}

    def get(key, name, data):
        return groups.setdefault(key, Group(key, name, data))

    for c in found.compressed.values():
        key, name = _model_of(c.plan)
        data = (c.plan.get("data") or {}).get("name")
        get(f"{key}|{data}", name, data).compressed.append(c)
    for edir, exp in found.exported.items():
        src = found.compressed.get(export_source.get(edir)) if export_source.get(edir) else None
        if src is not None:
            key, name = _model_of(src.plan)
            data = (src.plan.get("data") or {}).get("name")
            get(f"{key}|{data}", name, data).exports.append((exp, src))
        else:
            get("unlinked", "model unknown (export source not found)", None).exports.append((exp, None))
    out = sorted(groups.values(), key=lambda g: (g.key == "unlinked", g.label))
    for g in out:
        for c, label in zip(g.compressed, distinct_labels([c.path for c in g.compressed])):
            c.label = label
        g.compressed.sort(key=lambda c: (_sort_method(c.method), c.label))
    return out


def distinct_labels(paths: list[Path]) -> list[str]:
    """Each directory's name, or as many trailing components as it takes to tell it from the others'."""
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p.parts[-d:]) for p, d in zip(paths, depth)]
        counts = Counter(labels)
        clash = [i for i, lab in enumerate(labels) if counts[lab] > 1 and depth[i] < len(paths[i].parts)]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def _variant_labels(exports: list[tuple[Exported, Compressed | None]]) -> dict[Path, str]:
    """For exports of one source to one runtime, what tells them apart: the options that differ (mixed=layer),
    else the directory name. Empty when an export is the only one."""
    siblings: dict[tuple, list[Exported]] = {}
    for exp, src in exports:
        siblings.setdefault((src.path if src else exp.meta.get("source"), exp.meta.get("runtime")), []).append(exp)
    labels = {}
    for members in siblings.values():
        if len(members) == 1:
            labels[members[0].path] = ""
            continue
        opts = [{**(e.meta.get("options") or {}), **({"mixed": e.meta["mixed"]} if "mixed" in e.meta else {})}
                for e in members]
        shared = set.intersection(*(set(o) for o in opts))  # an option older exports did not record cannot differ
        keys = sorted(k for k in shared if k not in ("target", "data_dir")
                      and len({json.dumps(o[k]) for o in opts}) > 1)
        for e, o in zip(members, opts):
            text = ", ".join(f"{k}={o.get(k)}" for k in keys)
            labels[e.path] = text if keys and len({json.dumps([o.get(k) for k in keys]) for o in opts}) == \
                len(members) else e.path.name
    return labels


def runtime_rows(g: Group, profiles_by_export: dict[Path, list[dict]]) -> dict[str, list[dict]]:
    variants = _variant_labels(g.exports)
    by_runtime: dict[str, list[dict]] = {}
    for exp, src in g.exports:
        meta = exp.meta
        m = src.metrics if src else {}
        runtime = meta.get("runtime") or meta.get("target") or "?"
        method = meta.get("method") or m.get("method")
        run = src.label if src else Path(str(meta.get("source", "?"))).name
        acc_pt, acc_pt_from = (m.get("accuracy"), "metrics.json") if m.get("accuracy") is not None else \
            (meta.get("accuracy_pytorch"), "export.json" if meta.get("accuracy_pytorch") is not None else None)
        bytes_on_disk = meta.get("bytes_on_disk")
        fp32 = m.get("fp32_bytes")
        row = {
            "_baseline": src.baseline if src else None,
            "id": f"{run}/{runtime}" + (f"/{exp.path.name}" if variants.get(exp.path) else ""),
            "method": method, "run": run, "variant": variants.get(exp.path, ""), "runtime": runtime,
            "export_dir": str(exp.path), "source_dir": str(src.path) if src else meta.get("source"),
            "accuracy_runtime": meta.get("accuracy"), "accuracy_pytorch": acc_pt,
            "accuracy_pytorch_from": acc_pt_from, "top1_agreement": meta.get("top1_agreement"),
            "params": m.get("params"), "macs": m.get("macs"), "bytes_on_disk": bytes_on_disk,
            "plan_weight_bytes": (m.get("bytes") or {}).get("total"), "fp32_bytes": fp32,
            "compression_vs_fp32": fp32 / bytes_on_disk if fp32 and bytes_on_disk else None,
            "compression_vs_baseline_export": None, "baseline_export": None,
            "legalization": legalization_summary(meta.get("legalization") or []),
            "mixed": meta.get("mixed"),
            "profiles": sorted(profiles_by_export.get(exp.path, []),
                               key=lambda p: (str(p["device"]), p["batch"] or 0, p["threads"] or 0)),
        }
        by_runtime.setdefault(runtime, []).append(row)
    for rows in by_runtime.values():
        rows.sort(key=lambda r: (_sort_method(r["method"]), r["run"], r["variant"]))
        bases = [r for r in rows if r["method"] == "baseline" and r["bytes_on_disk"]]
        for r in rows:
            # the export of the baseline this run was compressed from; without provenance, the only baseline export
            own = r.pop("_baseline")
            base = next((b for b in bases if own is not None and b["source_dir"] == str(own)), None)
            if base is None and own is None and len(bases) == 1:
                base = bases[0]
            if base is not None and r["bytes_on_disk"]:
                r["compression_vs_baseline_export"] = base["bytes_on_disk"] / r["bytes_on_disk"]
                r["baseline_export"] = base["export_dir"]
    return dict(sorted(by_runtime.items(), key=lambda kv: _sort_runtime(kv[0])))


def attach_profiles(found: Found, profile_export: dict[Path, Path | None]) -> tuple[dict[Path, list[dict]], list]:
    """Profile summaries per export dir; of two profiles of one export on the same device, batch and threads the
    newer (by file time) is kept and the other named in the warnings."""
    chosen: dict[tuple, tuple[float, dict]] = {}
    warnings = []
    for pdir, prof in found.profiled.items():
        edir = profile_export.get(pdir)
        if edir is None:
            continue
        s = _profile_summary(pdir, prof.result)
        key = (edir, s["device"], s["batch"], s["threads"])
        mtime = (pdir / "profile.json").stat().st_mtime if (pdir / "profile.json").exists() else 0.0
        if key in chosen:
            older, newer = sorted([chosen[key], (mtime, s)], key=lambda t: t[0])
            warnings.append(f"{older[1]['path']} and {newer[1]['path']} profile the same export, device, batch and "
                            f"threads: the newer one is shown")
            chosen[key] = newer
        else:
            chosen[key] = (mtime, s)
    by_export: dict[Path, list[dict]] = {}
    for (edir, *_), (_, s) in chosen.items():
        by_export.setdefault(edir, []).append(s)
    return by_export, warnings


# ---------------------------------------------------------------------------------------------------------------
# The plan per layer


def layer_rows(plan: dict, reference: dict | None) -> list:
    """One row per quantized layer of `plan`: kept and original output channels, channels per bit width, and the
    sensitivities. The original count comes from an unpruned plan of the same model (`reference`, a quant-only
    run) when there is one, else from the pruning group the layer is named after; otherwise it stays unknown."""
    from hpqdeploy.plots import LayerRow

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
        rows.append(LayerRow(name, kept, original, dict(bits), q.get("sensitivity", sens.get(name)), group_sens))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def _si(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:,}"


def _bytes(n) -> str:
    from hpqdeploy.plots import human_bytes

    return "-" if n is None else human_bytes(n)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _num(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


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
    body = [[r["method"] or "-", r["run"], _pct(r["accuracy"]),
             "-" if r["accuracy_delta_points"] is None else f"{r['accuracy_delta_points']:+.2f}", _si(r["params"]),
             _si(r["macs"]), _bytes(r["weight_bytes"]), _ratio(r["compression_vs_fp32"]),
             "-" if r["low_bit_share"] is None else f"{100 * r['low_bit_share']:.0f}%"] for r in rows]
    return Table(cols, body, ["weight bytes: at the plan's bit widths plus scales, everything else fp32 "
                              "(metrics.json); vs fp32: the fp32 model's weight bytes divided by them"])


def latency_keys(rows: list[dict]) -> list[tuple]:
    keys = {(p["device"], p["batch"], p["threads"]) for r in rows for p in r["profiles"]}
    return sorted(keys, key=lambda k: (str(k[0]), k[1] or 0, k[2] or 0))


def _key_label(key: tuple, keys: list[tuple]) -> str:
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
        lab = _key_label(k, keys)
        cols += [f"p50 ms {lab}", f"p99 ms {lab}", f"inf/s {lab}", f"mJ/inf {lab}"]
    cols.append("legalization")
    reasons: dict[str, int] = {}
    body = []
    for r in rows:
        run = r["run"] + (f" ({r['variant']})" if r["variant"] else "")
        cells = [r["method"] or "-", run, _pct(r["accuracy_runtime"]), _pct(r["accuracy_pytorch"]),
                 _si(r["params"]), _si(r["macs"]), _bytes(r["bytes_on_disk"]), _bytes(r["plan_weight_bytes"]),
                 _ratio(r["compression_vs_fp32"]), _ratio(r["compression_vs_baseline_export"])]
        by_key = {(p["device"], p["batch"], p["threads"]): p for p in r["profiles"]}
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
            cells += [_num(p["p50_ms"]), _num(p["p99_ms"]), _num(p["throughput_per_s"], 4), energy]
        leg = r["legalization"]
        cells.append(f"{leg['count']}: {leg['summary']}" if leg["count"] else "0")
        body.append(cells)
    return Table(cols, body, [f"[{n}] energy not measured: {reason}" for reason, n in reasons.items()])


RUNTIME_LEGEND = ("acc (runtime): the artifact evaluated inside its runtime (export.json); acc (PyTorch): the "
                  "compressed model in PyTorch (metrics.json). bytes on disk: the artifact's files; plan weight "
                  "bytes: the plan's estimate (metrics.json); vs fp32 weights: the fp32 model's weight bytes, and vs "
                  "baseline export: this runtime's baseline artifact, each divided by bytes on disk. Latency per call "
                  "and energy per inference from profile.json, per device and batch size (b1 = batch 1).")


# ---------------------------------------------------------------------------------------------------------------
# The document: built once, rendered to Markdown and to HTML


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
    escaped = html_lib.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(blocks: list, images: dict[str, bytes], title: str) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# Plots for one model


def _points(rows: list[dict], x_of) -> list:
    from hpqdeploy.plots import Point

    pts = []
    for r in rows:
        x, acc = x_of(r), r.get("accuracy_runtime", r.get("accuracy"))
        if x and acc is not None:
            variant = ", ".join(v.removeprefix("mixed=") for v in r.get("variant", "").split(", ") if v)
            label = r["run"] + (f" {variant}" if variant else "")
            pts.append((r, Point(float(x), float(acc), label, r.get("runtime", "pytorch"), r["method"] or "?")))
    return pts


def _draw_model(g: Group, model: dict, work: Path) -> list:
    """The model's PNGs into `work`; returns report blocks that embed them and records files and fronts."""
    from hpqdeploy.plots import plot_layers, plot_tradeoff

    blocks, plots, fronts = [], {}, {}
    export_rows = [r for rows in model["runtimes"].values() for r in rows]
    if export_rows:
        pts = _points(export_rows, lambda r: r["bytes_on_disk"])
        xlabel, what = "artifact size on disk", "exported artifacts, accuracy measured in the runtime"
    else:
        pts = _points(model["pytorch"], lambda r: r["weight_bytes"])
        xlabel, what = "weight bytes at the plan's bit widths", "PyTorch (no exports found)"
    if pts:
        name = f"{g.slug}-accuracy-vs-bytes.png"
        plot_tradeoff([(what, [p for _, p in pts])], work / name, f"{g.label}: accuracy vs size", xlabel)
        front = [pts[i][0]["id"] for i in _front([p for _, p in pts])]
        plots["accuracy_vs_bytes"], fronts["bytes"] = name, front
        blocks.append(("img", name, f"{g.label}: accuracy vs bytes"))
    panels, fronts["latency"] = [], {}
    for key in latency_keys(export_rows):
        lab = _key_label(key, latency_keys(export_rows))
        rows = []
        for r in export_rows:
            p = next((p for p in r["profiles"] if (p["device"], p["batch"], p["threads"]) == key), None)
            if p is not None:
                rows.append({**r, "_p50": p["p50_ms"]})
        pts = _points(rows, lambda r: r["_p50"])
        if pts:
            panels.append((f"{lab}: p50 latency per call, batch {key[1]}", [p for _, p in pts]))
            fronts["latency"][lab] = [pts[i][0]["id"] for i in _front([p for _, p in pts])]
    if panels:
        name = f"{g.slug}-accuracy-vs-latency.png"
        plot_tradeoff(panels, work / name, f"{g.label}: accuracy vs latency (profile.json)",
                      "p50 latency per call (ms)", x_format="ms")
        plots["accuracy_vs_latency"] = name
        blocks.append(("img", name, f"{g.label}: accuracy vs latency"))
    reference = next((c.plan for c in g.compressed if not c.plan.get("pruning") and c.plan.get("quantization")),
                     None)
    for c in g.compressed:
        if c.method != "hybrid" or not c.plan.get("quantization"):
            continue
        rows = layer_rows(c.plan, reference)
        name = f"{g.slug}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', c.label)}-layers.png"
        m = c.metrics
        sub = ", ".join(s for s in (
            f"params {_si(m.get('params'))} of {_si((m.get('baseline') or {}).get('params'))}"
            if m.get("params") else "",
            f"low-bit share {100 * m['low_bit_share']:.0f}%" if m.get("low_bit_share") is not None else "",
            f"weights {_ratio(m.get('compression'))} smaller than fp32" if m.get("compression") else "",
            "original channels from the quant-only plan" if reference else "") if s)
        plot_layers(rows, work / name, f"{g.label} · {c.label}: the hybrid plan per layer", sub)
        plots.setdefault("layers", {})[c.label] = name
        blocks.append(("img", name, f"{g.label} {c.label}: plan per layer"))
    model["plots"], model["pareto"] = plots, fronts
    return blocks


def _front(points: list) -> list[int]:
    from hpqdeploy.plots import pareto_front

    return pareto_front([(p.x, p.accuracy) for p in points])


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def collect(dirs: list[Path]) -> tuple[dict, list[Group]]:
    """Everything the report shows, as the dict written to report.json (without plot files yet)."""
    found = discover([Path(d) for d in dirs])
    export_source, profile_export = link(found)
    profiles_by_export, warnings = attach_profiles(found, profile_export)
    groups = group(found, export_source)
    models = []
    for g in groups:
        models.append({"model": g.name, "data": g.data, "label": g.label,
                       "pytorch": [_pytorch_row(c, found.compressed.get(c.baseline)) for c in g.compressed],
                       "runtimes": runtime_rows(g, profiles_by_export)})
    report = {
        "format": FORMAT_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(d) for d in dirs],
        "counts": {"compressed": len(found.compressed), "exports": len(found.exported),
                   "profiles": len(found.profiled)},
        "models": models, "warnings": found.warnings + warnings,
    }
    return report, groups


def _document(report: dict, model_blocks: list[list]) -> list:
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


def run_report(dirs: list[Path], out: Path, html: bool = False) -> dict:
    """Collect every result under `dirs` and write report.md, report.json and the PNGs (and report.html when
    `html`) into `out`, atomically. Returns what report.json holds."""
    from hpqdeploy.plots import require_matplotlib

    out = Path(out)
    if out.exists():
        raise UserError(f"output directory {out} exists; choose another -o or remove it")
    require_matplotlib()
    report, groups = collect(dirs)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        model_blocks = [_draw_model(g, m, work) for g, m in zip(groups, report["models"])]
        blocks = _document(report, model_blocks)
        (work / "report.md").write_text(render_markdown(blocks))
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if html:
            images = {p.name: p.read_bytes() for p in work.glob("*.png")}
            (work / "report.html").write_text(render_html(blocks, images, "hpqdeploy report"))
        work.replace(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report
