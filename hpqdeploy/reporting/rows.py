"""The comparison rows, unformatted: one per compressed model in PyTorch, one per export in its runtime with the
profiles measured on it. Nothing is estimated: a value no result file holds is None."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hpqdeploy.reporting.collect import Compressed, Exported, Found
from hpqdeploy.reporting.groups import METHOD_ORDER, Group, rank

RUNTIME_ORDER = ("onnxruntime", "openvino", "executorch", "tensorrt")


def legalization_summary(changes: list[dict]) -> dict:
    """Count and a short text by kind: "weight bits ×40 → 8-bit; layout ×1"."""
    kinds = Counter(c.get("what", "?") for c in changes)
    parts = []
    for what, n in kinds.most_common():
        afters = {c.get("after") for c in changes if c.get("what", "?") == what}
        after = next(iter(afters)) if len(afters) == 1 else None
        parts.append(f"{what} ×{n}" + (f" → {after}" if after and len(str(after)) <= 24 else ""))
    return {"count": len(changes), "by_kind": dict(kinds.most_common()), "summary": "; ".join(parts)}


def profile_key(p: dict) -> tuple:
    """What a profile was measured on: device, batch size, threads."""
    return p["device"], p["batch"], p["threads"]


def _key_order(key: tuple) -> tuple:
    device, batch, threads = key
    return str(device), batch or 0, threads or 0


def latency_keys(rows: list[dict]) -> list[tuple]:
    return sorted({profile_key(p) for r in rows for p in r["profiles"]}, key=_key_order)


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
        key = (edir, *profile_key(s))
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


def pytorch_row(c: Compressed, baseline: Compressed | None) -> dict:
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
        run = src.label if src else Path(str(meta.get("source", "?"))).name
        acc_pt, acc_pt_from = (m.get("accuracy"), "metrics.json") if m.get("accuracy") is not None else \
            (meta.get("accuracy_pytorch"), "export.json" if meta.get("accuracy_pytorch") is not None else None)
        bytes_on_disk = meta.get("bytes_on_disk")
        fp32 = m.get("fp32_bytes")
        row = {
            "_baseline": src.baseline if src else None,
            "id": f"{run}/{runtime}" + (f"/{exp.path.name}" if variants.get(exp.path) else ""),
            "method": meta.get("method") or m.get("method"), "run": run, "variant": variants.get(exp.path, ""),
            "runtime": runtime, "export_dir": str(exp.path), "source_dir": str(src.path) if src else meta.get("source"),
            "accuracy_runtime": meta.get("accuracy"), "accuracy_pytorch": acc_pt,
            "accuracy_pytorch_from": acc_pt_from, "top1_agreement": meta.get("top1_agreement"),
            "params": m.get("params"), "macs": m.get("macs"), "bytes_on_disk": bytes_on_disk,
            "plan_weight_bytes": (m.get("bytes") or {}).get("total"), "fp32_bytes": fp32,
            "compression_vs_fp32": fp32 / bytes_on_disk if fp32 and bytes_on_disk else None,
            "compression_vs_baseline_export": None, "baseline_export": None,
            "legalization": legalization_summary(meta.get("legalization") or []),
            "mixed": meta.get("mixed"),
            "profiles": sorted(profiles_by_export.get(exp.path, []), key=lambda p: _key_order(profile_key(p))),
        }
        by_runtime.setdefault(runtime, []).append(row)
    for rows in by_runtime.values():
        rows.sort(key=lambda r: (rank(r["method"], METHOD_ORDER), r["run"], r["variant"]))
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
    return dict(sorted(by_runtime.items(), key=lambda kv: rank(kv[0], RUNTIME_ORDER)))
