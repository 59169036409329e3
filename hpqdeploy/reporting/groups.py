"""Results grouped by model (the plan's model spec and data set), each run labelled so that two runs read apart."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hpqdeploy.reporting.collect import Compressed, Exported, Found

METHOD_ORDER = ("baseline", "prune", "quant", "hybrid")


def rank(value: str | None, order: tuple[str, ...]) -> tuple:
    """Sort key: the known values in `order`, then any other alphabetically."""
    return (order.index(value) if value in order else len(order), value or "")


def file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


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
        return file_safe(self.label).strip("-").lower()


def group(found: Found, export_source: dict[Path, Path | None]) -> list[Group]:
    groups: dict[str, Group] = {}

    def of_plan(plan: dict) -> Group:
        spec = plan.get("model") or {}
        name = str(spec.get("name", "unknown model"))
        if "/" in name or os.sep in name:
            name = Path(name).name
        data = (plan.get("data") or {}).get("name")
        key = f"{spec.get('family', '?')}:{name}|{data}"
        return groups.setdefault(key, Group(key, name, data))

    for c in found.compressed.values():
        of_plan(c.plan).compressed.append(c)
    for edir, exp in found.exported.items():
        src = found.compressed.get(export_source.get(edir))
        if src is not None:
            of_plan(src.plan).exports.append((exp, src))
        else:
            groups.setdefault("unlinked", Group("unlinked", "model unknown (export source not found)", None)) \
                .exports.append((exp, None))
    out = sorted(groups.values(), key=lambda g: (g.key == "unlinked", g.label))
    for g in out:
        for c, label in zip(g.compressed, distinct_labels([c.path for c in g.compressed])):
            c.label = label
        g.compressed.sort(key=lambda c: (rank(c.method, METHOD_ORDER), c.label))
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
