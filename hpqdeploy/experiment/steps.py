"""The experiment's steps in run order, each with its input hash and the stage call that makes its output.

A step's hash is sha256 of its kind, its own settings and the hashes of the steps it depends on; the baseline's also
covers its input files (the weights' content; a local model or baseline directory by file names, sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hpqdeploy.errors import MissingExtra, UserError
from hpqdeploy.experiment.config import ExperimentConfig, compress_options, fields_of, local_model, train_config

MARKERS = {"baseline": "metrics.json", "compress": "metrics.json", "export": "export.json",
           "profile": "profile.json", "report": "report.json"}  # the file a finished output of each kind holds


@dataclass
class Step:
    name: str
    kind: str  # baseline | compress | export | profile | report
    output: Path  # absolute
    settings: dict  # what the hash covers, besides the dependencies
    deps: tuple[str, ...] = ()
    # (output, resume), the report's also (..., the finished steps to report on); None: nothing to run (an existing dir)
    action: Callable[..., Any] | None = None
    hash: str = ""


def step_hash(kind: str, settings: dict, dep_hashes: list) -> str:
    blob = json.dumps({"step": kind, "settings": settings, "deps": dep_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(path: Path) -> list:
    """Names, sizes and mtimes of the files in a directory (a baseline or a local model: cheap, not content)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class StageUnavailable(UserError):
    """A stage this machine cannot run (recorded as skipped)."""


def environment_reason(kind: str, exc: BaseException) -> str | None:
    """Why `exc` is this machine's doing rather than the experiment's, or None.

    A missing optional package is always the machine's. So is any user error of a profile step: the device, runner
    and options were validated before the run and the export was made by this experiment, so what is left is whether
    this machine can run it (no runner for the runtime on this device kind, runtime not installed, no GPU, no device
    attached)."""
    if isinstance(exc, (MissingExtra, StageUnavailable)):
        return str(exc)
    if kind == "profile" and isinstance(exc, UserError):
        return str(exc)
    return None


def plan_steps(cfg: ExperimentConfig, quiet: bool, command: str) -> list[Step]:
    """Every step of the experiment in run order, each with its input hash (the report's is set when it runs)."""
    steps: list[Step] = []
    by_name: dict[str, Step] = {}

    def add(step: Step) -> None:
        step.hash = step_hash(step.kind, step.settings, [by_name[d].hash for d in step.deps])
        steps.append(step)
        by_name[step.name] = step

    def provenance(name: str) -> str:
        return f"{command} [step {name}]" if command else f"hpqdeploy experiment {cfg.path} [step {name}]"

    add(_baseline_step(cfg, quiet, provenance("baseline")))
    for method, s in cfg.compress.items():
        add(Step(f"compress/{method}", "compress", cfg.out / "compress" / method, {"method": method, **s},
                 ("baseline",), _compress_action(cfg, method, s, quiet, provenance(f"compress/{method}"))))
    if cfg.export:
        sources = ["baseline", *cfg.compress]
        export = {k: v for k, v in cfg.export.items() if k != "targets"}
        for source in sources:
            for target in cfg.export["targets"]:
                name = f"export/{source}-{target}"
                dep = "baseline" if source == "baseline" else f"compress/{source}"
                add(Step(name, "export", cfg.out / "export" / f"{source}-{target}", {"target": target, **export},
                         (dep,), _export_action(cfg, by_name[dep], target, quiet, provenance(name))))
        if cfg.profile:
            prof = {k: v for k, v in cfg.profile.items() if k not in ("targets", "batch_sizes")}
            targets = cfg.profile["targets"] or cfg.export["targets"]
            for source in sources:
                for target in targets:
                    for batch in cfg.profile["batch_sizes"]:
                        name = f"profile/{source}-{target}-b{batch}"
                        dep = f"export/{source}-{target}"
                        add(Step(name, "profile", cfg.out / "profile" / f"{source}-{target}-b{batch}",
                                 {"batch_size": batch, **prof}, (dep,),
                                 _profile_action(cfg, by_name[dep], batch, provenance(name))))
    others = tuple(s.name for s in steps)
    steps.append(Step("report", "report", cfg.out / "report", dict(cfg.report), others,
                      _report_action(cfg, by_name)))
    return steps


def _data_dir(cfg: ExperimentConfig) -> str | None:
    return str(cfg.data_dir) if cfg.data_dir else None


def _baseline_step(cfg: ExperimentConfig, quiet: bool, command: str) -> Step:
    s = cfg.baseline
    if s["dir"] is not None:
        d = cfg.resolve(s["dir"])
        settings = {"dir": s["dir"], "files": dir_fingerprint(d)}
        return Step("baseline", "baseline", d, settings)  # exists already: nothing to run
    inputs: dict[str, Any] = {}
    if s["weights"] is not None:
        inputs["weights_sha256"] = file_sha256(cfg.resolve(s["weights"]))
    local = local_model(cfg.root, s["model"])
    if local is not None:
        inputs["model_files"] = dir_fingerprint(local)

    def action(out: Path, resume: bool):
        from hpqdeploy.config import DataOptions
        from hpqdeploy.pipeline import run_train

        model = str(local) if local is not None else s["model"]
        data = DataOptions(**{**fields_of(DataOptions, s), "data_dir": _data_dir(cfg)})
        return run_train(model, data, out, train_config(s, cfg.seed), cfg.resolve(s["weights"]), s["max_length"],
                         quiet, resume, command, s["scratch"], s["dropout"], cfg.compute)

    return Step("baseline", "baseline", cfg.out / "baseline", {**s, "seed": cfg.seed, **inputs}, (), action)


def _compress_action(cfg: ExperimentConfig, method: str, s: dict, quiet: bool, command: str):
    def action(out: Path, resume: bool):
        from hpqdeploy.config import DataOptions
        from hpqdeploy.pipeline import run_compress

        baseline = cfg.resolve(cfg.baseline["dir"]) if cfg.baseline["dir"] else cfg.out / "baseline"
        recorded = json.loads((baseline / "plan.json").read_text())["data"]
        given = {k: s[k] for k in ("train_limit", "eval_limit") if s[k] is not None}
        data = DataOptions(**{**recorded, **given, "data_dir": _data_dir(cfg) or recorded.get("data_dir")})
        return run_compress(baseline, out, compress_options(method, s, cfg.seed), data, quiet, resume, command,
                            cfg.compute)

    return action


def _export_action(cfg: ExperimentConfig, source: Step, target: str, quiet: bool, command: str):
    def action(out: Path, resume: bool):
        from hpqdeploy.config import ExportOptions
        from hpqdeploy.lower.export import run_export

        opts = ExportOptions(**{**fields_of(ExportOptions, cfg.export), "target": target, "data_dir": _data_dir(cfg)})
        return run_export(source.output, out, opts, quiet, command)

    return action


def _profile_action(cfg: ExperimentConfig, export: Step, batch: int, command: str):
    def action(out: Path, resume: bool):
        from hpqdeploy.config import ProfileOptions
        from hpqdeploy.device.profile import run_profile

        opts = ProfileOptions(**{**fields_of(ProfileOptions, cfg.profile), "batch_size": batch,
                                 "data_dir": _data_dir(cfg)})
        return run_profile(export.output, out, opts, command=command)

    return action


def _report_action(cfg: ExperimentConfig, by_name: dict[str, Step]):
    def action(out: Path, resume: bool, done: list[str]):
        try:
            from hpqdeploy.reporting import run_report
        except ImportError as exc:
            raise StageUnavailable(f"the report stage is not available here ({exc})") from None
        return run_report([by_name[n].output for n in done], out, html=cfg.report["html"])

    return action
