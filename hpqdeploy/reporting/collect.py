"""Find the result directories `train`/`compress`, `export` and `profile` wrote, read them and link them: an export
to its compressed model by its `source`, a profile to its export by its `artifact`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hpqdeploy import formats
from hpqdeploy.errors import UserError

INPUT_KINDS = "metrics.json + plan.json (train/compress), export.json (export) or profile.json (profile)"


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


def read_json(path: Path) -> dict:
    try:
        blob = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run the command that wrote it") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror})") from None
    if not isinstance(blob, dict):
        raise UserError(f"{path} holds a JSON {type(blob).__name__}, not the object hpqdeploy writes")
    return formats.check(path, blob)


def _compressed(path: Path) -> Compressed:
    prov = path / "provenance.json"
    return Compressed(path, read_json(path / "metrics.json"), read_json(path / "plan.json"),
                      read_json(prov) if prov.is_file() else {})


def _exported(path: Path) -> Exported:
    return Exported(path, read_json(path / "export.json"))


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
        found.exported.setdefault(key, _exported(key))
        hit = True
    if "profile.json" in files:
        found.profiled.setdefault(key, Profiled(key, read_json(path / "profile.json")))
        hit = True
    return hit


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
    if (same := p.resolve()) in known:
        return same
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


def _find(recorded: str | None, known: dict, read, *markers: str) -> Path | None:
    """The directory of `known` that `recorded` names; else the recorded directory itself, read into `known`, when
    it is still on disk with all `markers`."""
    hit = _locate(recorded, known)
    if hit is None and recorded and all((Path(recorded) / m).is_file() for m in markers):
        hit = Path(recorded).resolve()
        known[hit] = read(hit)
    return hit


def link(found: Found) -> tuple[dict[Path, Path | None], dict[Path, Path | None]]:
    """export dir -> compress dir, profile dir -> export dir. A source named by a result but not among the inputs is
    read from where it was recorded when it is still there."""
    export_source, profile_export = {}, {}
    for pdir, prof in sorted(found.profiled.items()):
        artifact = prof.result.get("artifact")
        profile_export[pdir] = _find(artifact, found.exported, _exported, "export.json")
        if profile_export[pdir] is None:
            found.warnings.append(f"profile {pdir}: its export {artifact} is neither among the inputs nor on disk; "
                                  "left out")
    for edir, exp in sorted(found.exported.items()):
        source = exp.meta.get("source")
        export_source[edir] = _find(source, found.compressed, _compressed, "plan.json", "metrics.json")
        if export_source[edir] is None:
            found.warnings.append(f"export {edir}: its source {source} is neither among the inputs nor on disk; "
                                  "PyTorch figures for it are missing")
    for c in found.compressed.values():
        c.baseline = c.path if c.method == "baseline" else _locate(c.provenance.get("baseline"), found.compressed)
    return export_source, profile_export
