"""`hpqdeploy experiment CONFIG.toml`: the whole plan from one file, resumable step by step.

One TOML names a baseline, the compression methods, the export targets, the device and batch sizes to profile on,
and the report. Each step (`baseline`, `compress/<method>`, `export/<source>-<target>`,
`profile/<source>-<target>-b<batch>`, `report`) has an input hash: sha256 of its own settings (as written in the
file, defaults filled in) and the hashes of the steps it depends on; the baseline's also covers its input files
(the weights' content; a local model or baseline directory by file names, sizes and mtimes). The data is named,
not hashed. `experiment.json` in the output directory records per step its hash, output, status and seconds.

On a re-run a finished step is kept when its hash matches, the outputs it was made from are the ones on disk and
its own output exists; anything else runs again and replaces its stale output, and through the hash chain so does
everything downstream. An interrupted step (an exception or Ctrl-C) leaves no finished record: its next run
continues from the last epoch checkpoint in `<dir>.partial` (train and compress) when its inputs are unchanged.

A step that fails for a reason of this machine (a runtime package missing, no runner for the artifact on this
device, a device not attached) is recorded as `skipped` with the reason, and the steps that need it are skipped
too; any other error stops the run with one line, keeping what finished.

    [experiment]  name, out (default runs/<name>), seed
    [baseline]    model + data (+ weights, data_dir, epochs, lr, ...), or dir = an existing `train` output
    [compress]    methods = [...] and compress settings; [compress.<method>] overrides them for one method
    [export]      targets = [...], mixed, batch_size, eval_limit, ...
    [profile]     device, batch_sizes = [...], iters, repeats, warmup, ... (targets: which exports to profile)
    [report]      html

Paths are relative to the TOML file's directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from hpqdeploy.errors import MissingExtra, UserError

STATE_FILE = "experiment.json"
STATE_FORMAT = 1
TEXT_DATA = ("sst2", "qqp")  # default batch 32 (text), else 64 (images), as the CLI does
MARKERS = {"baseline": "metrics.json", "compress": "metrics.json", "export": "export.json",
           "profile": "profile.json", "report": "report.json"}
UNFINISHED = ("running", "failed", "interrupted")


# ---------------------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class Key:
    kind: str  # int | float | str | bool | path | ints | strs
    default: Any = None  # None: not set (the stage's own default applies)
    choices: Callable[[], list[str]] | tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None


KINDS = {"int": "an integer", "float": "a number", "str": "a string", "path": "a path (string)",
         "bool": "true or false", "ints": "a list of integers", "strs": "a list of strings"}


def _at_least(n):
    return lambda v: None if min(v if isinstance(v, list) else [v]) >= n else f"must be >= {n}"


def _between(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check


def _positive(v):
    return None if v > 0 else "must be > 0"


def _nonempty(v):
    return None if v else "must not be empty"


def _datasets():
    from hpqdeploy.data import dataset_names

    return dataset_names()


def _methods():
    from hpqdeploy.pipeline import METHODS

    return list(METHODS)


def _criteria():
    from hpqdeploy.importance import CRITERIA

    return list(CRITERIA)


def _compress_targets():
    from hpqdeploy.targets import target_names

    return target_names()


def _runtimes():
    from hpqdeploy.lower.base import runtime_names

    return runtime_names()


def _mixed_modes():
    from hpqdeploy.lower.legalize import MIXED_MODES

    return list(MIXED_MODES)


def _overflow_fix():
    from hpqdeploy.lower.legalize import OVERFLOW_FIX

    return list(OVERFLOW_FIX)


def _devices():
    from hpqdeploy.device_profiles import profile_names

    return profile_names()


def _runners():
    from hpqdeploy.runners.base import runner_names

    return runner_names()


EXPERIMENT = {"name": Key("str", check=_nonempty), "out": Key("path"), "seed": Key("int", 0)}
TRAIN = {"epochs": Key("int", 10, check=_at_least(0)), "lr": Key("float", 1e-3, check=_positive),
         "weight_decay": Key("float", 1e-4, check=_at_least(0)), "batch_size": Key("int", check=_at_least(1)),
         "train_limit": Key("int", check=_at_least(1)), "eval_limit": Key("int", check=_at_least(1))}
BASELINE = {"model": Key("str", check=_nonempty), "weights": Key("path"), "scratch": Key("bool", False),
            "dir": Key("path"), "data": Key("str", choices=_datasets), "data_dir": Key("path"),
            "calib_size": Key("int", 512, check=_at_least(1)), "max_length": Key("int", 64, check=_at_least(1)),
            **TRAIN}
BASELINE_DIR_KEYS = ("dir", "data_dir")  # with `dir` the baseline exists; only where its data lives may change
COMPRESS = {"prune_ratio": Key("float", 0.3, check=_between(0, 1, True, True)),
            "bits": Key("ints", [8, 4], check=_nonempty), "low_bit_share": Key("float", 0.5, check=_between(0, 1)),
            "act_bits": Key("int", 8, check=_between(0, 8)), "importance": Key("str", "taylor", choices=_criteria),
            "target": Key("str", choices=_compress_targets), "calib_batches": Key("int", 8, check=_at_least(1)),
            "distill": Key("float", 0.9, check=_between(0, 1, hi_open=True)),
            "temperature": Key("float", 4.0, check=_positive), **TRAIN}
EXPORT = {"targets": Key("strs", choices=_runtimes, check=_nonempty),
          "mixed": Key("str", "split", choices=_mixed_modes), "batch_size": Key("int", 32, check=_at_least(1)),
          "eval_limit": Key("int", check=_at_least(1)), "calib_batches": Key("int", 8, check=_at_least(1)),
          "threads": Key("int", 1, check=_at_least(1)), "overflow_fix": Key("str", "auto", choices=_overflow_fix)}
PROFILE = {"device": Key("str", "x86", choices=_devices), "targets": Key("strs", choices=_runtimes),
           "batch_sizes": Key("ints", [1], check=lambda v: _nonempty(v) or _at_least(1)(v)),
           "iters": Key("int", 200, check=_at_least(1)), "repeats": Key("int", 3, check=_at_least(1)),
           "warmup": Key("int", 20, check=_at_least(0)), "threads": Key("int", 1, check=_at_least(1)),
           "min_seconds": Key("float", 0.0, check=_at_least(0)), "idle_seconds": Key("float", 2.0, check=_at_least(0)),
           "runner": Key("str", choices=_runners), "meter": Key("str"), "pin_clocks": Key("bool", False),
           "serial": Key("str")}
REPORT = {"html": Key("bool", False)}
SECTIONS = {"experiment": EXPERIMENT, "baseline": BASELINE, "compress": COMPRESS, "export": EXPORT,
            "profile": PROFILE, "report": REPORT}


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment file: every section with its defaults filled in (None: not set)."""

    path: Path
    name: str
    out: Path
    seed: int
    baseline: dict
    compress: dict[str, dict]  # method -> its settings ([compress] merged with [compress.<method>])
    export: dict | None
    profile: dict | None
    report: dict
    data: str  # the data set's name (from [baseline] or the baseline directory's plan)

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, value: str | None) -> Path | None:
        return None if value is None else _resolve(self.root, value)

    @property
    def data_dir(self) -> Path | None:
        return self.resolve(self.baseline.get("data_dir"))

    def settings(self) -> dict:
        return {"name": self.name, "out": str(self.out), "seed": self.seed, "baseline": self.baseline,
                "compress": self.compress, "export": self.export, "profile": self.profile, "report": self.report}


def _resolve(root: Path, value: str) -> Path:
    return (root / Path(value).expanduser()).resolve()


def _type_ok(value, kind: str) -> bool:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "int":
        return is_int(value)
    if kind == "float":
        return is_int(value) or isinstance(value, float)
    if kind in ("str", "path"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "ints":
        return isinstance(value, list) and all(is_int(v) for v in value)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)  # strs


def _toml_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> UserError:
        return UserError(f"{self.path}: {message}")

    def unknown(self, where: str, key: str, known) -> UserError:
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"did you mean {where}{close[0]}?" if close else f"known: {', '.join(known)}"
        return self.fail(f"unknown key {where}{key}; {hint}")

    def section(self, name: str, table, schema: dict[str, Key], allow_tables: tuple[str, ...] = ()) -> dict:
        if not isinstance(table, dict):
            raise self.fail(f"{name} must be a table ([{name}]), got a {_toml_type(table)}")
        out = {}
        for key, value in table.items():
            if key in allow_tables:
                continue
            if key not in schema:
                raise self.unknown(f"{name}.", key, [*schema, *allow_tables])
            out[key] = self.value(f"{name}.{key}", value, schema[key])
        return {k: out.get(k, schema[k].default) for k in schema}

    def value(self, where: str, value, key: Key):
        if not _type_ok(value, key.kind):
            raise self.fail(f"{where} must be {KINDS[key.kind]}, got {value!r} ({_toml_type(value)})")
        if key.choices is not None:
            choices = key.choices() if callable(key.choices) else key.choices
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v not in choices:
                    raise self.fail(f"{where}: unknown {where.rsplit('.', 1)[-1].rstrip('s')} {v!r}; "
                                    f"choose from {', '.join(choices)}")
            if isinstance(value, list) and len(set(value)) != len(value):
                raise self.fail(f"{where} lists a name twice: {value}")
        if key.check is not None and (problem := key.check(value)):
            raise self.fail(f"{where} {problem}, got {value!r}")
        return value


def load_config(path: Path) -> ExperimentConfig:
    """Read and validate an experiment file; every problem is one UserError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {path} not found")
    try:
        blob = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc})") from None
    path = path.resolve()
    c = _Checker(path)
    for name in blob:
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, list(SECTIONS), n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"known: {', '.join(f'[{s}]' for s in SECTIONS)}"
            raise c.fail(f"unknown section [{name}]; {hint}")
    if "baseline" not in blob:
        raise c.fail("[baseline] is missing: give model and data (to train one) or dir (an existing baseline)")
    exp = c.section("experiment", blob.get("experiment", {}), EXPERIMENT)
    name = exp["name"] or path.stem
    out = _resolve(path.parent, exp["out"] or f"runs/{name}")
    baseline, data = _baseline(c, blob["baseline"], path.parent)

    compress = {}
    if "compress" in blob:
        table = blob["compress"]
        methods_key = Key("strs", choices=_methods, check=_nonempty)
        if not isinstance(table, dict):
            raise c.fail(f"compress must be a table ([compress]), got a {_toml_type(table)}")
        if "methods" not in table:
            raise c.fail("compress.methods is missing: list the methods to run, e.g. methods = [\"hybrid\"]")
        methods = c.value("compress.methods", table["methods"], methods_key)
        shared = c.section("compress", {k: v for k, v in table.items() if k != "methods"}, COMPRESS,
                           allow_tables=tuple(_methods()))
        for method in _methods():
            if method in table and method not in methods:
                raise c.fail(f"[compress.{method}] is set but {method!r} is not in compress.methods")
        for method in methods:
            own = c.section(f"compress.{method}", table.get(method, {}), COMPRESS)
            explicit = table.get(method, {})
            settings = {k: (own[k] if k in explicit else shared[k]) for k in COMPRESS}
            settings["batch_size"] = settings["batch_size"] or (32 if data in TEXT_DATA else 64)
            _check_compress(c, method, settings)
            compress[method] = settings

    export = c.section("export", blob["export"], EXPORT) if "export" in blob else None
    if export is not None and not export["targets"]:
        raise c.fail("export.targets is missing: list the runtimes, e.g. targets = [\"onnxruntime\"]")
    profile = None
    if "profile" in blob:
        if export is None:
            raise c.fail("[profile] needs an [export] section: profiles measure exported artifacts")
        profile = c.section("profile", blob["profile"], PROFILE)
        for t in profile["targets"] or []:
            if t not in export["targets"]:
                raise c.fail(f"profile.targets: {t!r} is not in export.targets ({', '.join(export['targets'])})")
        _check_profile(c, profile, export["targets"])
    report = c.section("report", blob.get("report", {}), REPORT)
    return ExperimentConfig(path, name, out, exp["seed"], baseline, compress, export, profile, report, data)


def _baseline(c: _Checker, table, root: Path) -> tuple[dict, str]:
    settings = c.section("baseline", table, BASELINE)
    given = set(table)
    if settings["dir"] is not None:
        extra = sorted(given - set(BASELINE_DIR_KEYS))
        if extra:
            raise c.fail(f"baseline.{extra[0]} cannot be combined with baseline.dir (the baseline exists already; "
                         "its settings are in its provenance.json)")
        d = _resolve(root, settings["dir"])
        try:
            plan = json.loads((d / "plan.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise c.fail(f"baseline.dir: {d} is not a `hpqdeploy train` output (no readable plan.json)") from None
        if plan.get("method") != "baseline":
            raise c.fail(f"baseline.dir: {d} is a {plan.get('method')!r} artifact; name a `hpqdeploy train` output")
        data = plan.get("data", {}).get("name", "")
    else:
        for key in ("model", "data"):
            if settings[key] is None:
                raise c.fail(f"baseline.{key} is missing (or give baseline.dir, an existing `train` output)")
        data = settings["data"]
        settings["batch_size"] = settings["batch_size"] or (32 if data in TEXT_DATA else 64)
        if settings["weights"] is not None and not _resolve(root, settings["weights"]).is_file():
            raise c.fail(f"baseline.weights: file {_resolve(root, settings['weights'])} not found")
        _check_model(c, settings["model"], root)
    if settings["data_dir"] is not None and not _resolve(root, settings["data_dir"]).exists():
        raise c.fail(f"baseline.data_dir: {_resolve(root, settings['data_dir'])} does not exist")
    return settings, data


def local_model(root: Path, name: str) -> Path | None:
    """The directory `baseline.model` names (a Hugging Face model or a `train` output, relative to the file), or
    None for a model name. Registered names win, so a directory that happens to be called `minilm` is not taken."""
    from hpqdeploy.models import registry

    registry._import_families()
    path = _resolve(root, name)
    if name in registry.model_names() or not path.is_dir():
        return None
    return path if (path / "config.json").is_file() or (path / "plan.json").is_file() else None


def _check_model(c: _Checker, name: str, root: Path) -> None:
    from hpqdeploy.models import registry

    if local_model(root, name) is not None:
        return
    try:
        registry._family_of(name)
    except UserError as exc:
        raise c.fail(f"baseline.model: {exc}") from None


def _check_compress(c: _Checker, method: str, s: dict) -> None:
    try:
        _compress_options(method, s, seed=0).validate()
    except UserError as exc:  # the stage's own checks (bits, distillation), named by key here
        raise c.fail(f"compress.{method}: {exc}") from None


def _check_profile(c: _Checker, s: dict, targets: list[str]) -> None:
    if s["runner"] is not None:
        from hpqdeploy.runners.base import get_runner

        runtime = get_runner(s["runner"]).runtime
        if any(t != runtime for t in (s["targets"] or targets)):
            raise c.fail(f"profile.runner {s['runner']!r} runs only {runtime} artifacts; "
                         f"set profile.targets = [\"{runtime}\"] or remove profile.runner")


# ---------------------------------------------------------------------------------------------------------------
# Steps


@dataclass
class Step:
    name: str
    kind: str  # baseline | compress | export | profile | report
    output: Path  # absolute
    settings: dict  # what the hash covers, besides the dependencies
    deps: tuple[str, ...] = ()
    action: Callable[[Path, bool], Any] | None = None  # (output, resume); None: nothing to run (an existing dir)
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


def _compress_options(method: str, s: dict, seed: int):
    from hpqdeploy.finetune import TrainConfig
    from hpqdeploy.pipeline import CompressOptions

    train = TrainConfig(s["epochs"], s["lr"], s["weight_decay"], s["batch_size"], seed, s["distill"],
                        s["temperature"])
    return CompressOptions(method, s["prune_ratio"], tuple(s["bits"]), s["low_bit_share"], s["act_bits"] or None,
                           s["importance"], s["target"], s["calib_batches"], train)


def plan_steps(cfg: ExperimentConfig, quiet: bool, command: str) -> list[Step]:
    """Every step of the experiment in run order, each with its input hash (the report's is set when it runs)."""
    steps: list[Step] = []
    by_name: dict[str, Step] = {}

    def add(step: Step) -> None:
        step.hash = step.hash or step_hash(step.kind, step.settings, [by_name[d].hash for d in step.deps])
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
        from hpqdeploy.finetune import TrainConfig
        from hpqdeploy.pipeline import DataOptions, run_train

        model = str(local) if local is not None else s["model"]
        data_dir = cfg.data_dir
        data = DataOptions(s["data"], str(data_dir) if data_dir else None, s["calib_size"], s["train_limit"],
                           s["eval_limit"])
        train = TrainConfig(s["epochs"], s["lr"], s["weight_decay"], s["batch_size"], cfg.seed)
        return run_train(model, data, out, train, cfg.resolve(s["weights"]), s["max_length"], quiet, resume,
                         command, s["scratch"])

    return Step("baseline", "baseline", cfg.out / "baseline", {**s, "seed": cfg.seed, **inputs}, (), action)


def _compress_action(cfg: ExperimentConfig, method: str, s: dict, quiet: bool, command: str):
    def action(out: Path, resume: bool):
        from hpqdeploy.pipeline import DataOptions, run_compress

        baseline = _baseline_dir(cfg)
        data = DataOptions(**json.loads((baseline / "plan.json").read_text())["data"])
        for key in ("train_limit", "eval_limit"):
            if s[key] is not None:
                setattr(data, key, s[key])
        if cfg.data_dir:
            data.data_dir = str(cfg.data_dir)
        return run_compress(baseline, out, _compress_options(method, s, cfg.seed), data, quiet, resume, command)

    return action


def _baseline_dir(cfg: ExperimentConfig) -> Path:
    return cfg.resolve(cfg.baseline["dir"]) if cfg.baseline["dir"] else cfg.out / "baseline"


def _export_action(cfg: ExperimentConfig, source: Step, target: str, quiet: bool, command: str):
    def action(out: Path, resume: bool):
        from hpqdeploy.export import ExportOptions, run_export

        e = cfg.export
        opts = ExportOptions(target, e["mixed"], e["batch_size"], e["eval_limit"], e["calib_batches"], e["threads"],
                             str(cfg.data_dir) if cfg.data_dir else None, e["overflow_fix"])
        return run_export(source.output, out, opts, quiet, command)

    return action


def _profile_action(cfg: ExperimentConfig, export: Step, batch: int, command: str):
    def action(out: Path, resume: bool):
        from hpqdeploy.profile import ProfileOptions, run_profile

        p = cfg.profile
        opts = ProfileOptions(p["device"], p["runner"], batch, p["threads"], p["warmup"], p["iters"],
                              p["min_seconds"], p["repeats"], p["idle_seconds"], p["pin_clocks"], p["serial"],
                              str(cfg.data_dir) if cfg.data_dir else None, p["meter"])
        return run_profile(export.output, out, opts, quiet=True, command=command)

    return action


def _report_action(cfg: ExperimentConfig, by_name: dict[str, Step]):
    def action(out: Path, resume: bool, done: list[str]):
        try:
            from hpqdeploy.reporting import run_report
        except ImportError as exc:
            raise _Unavailable(f"the report stage is not available here ({exc})") from None
        return run_report([by_name[n].output for n in done], out, html=cfg.report["html"])

    return action


class _Unavailable(UserError):
    """A stage this machine cannot run (recorded as skipped)."""


def environment_reason(kind: str, exc: BaseException) -> str | None:
    """Why `exc` is this machine's doing rather than the experiment's, or None.

    A missing optional package is always the machine's. So is any user error of a profile step: the device, runner
    and options were validated before the run and the export was made by this experiment, so what is left is whether
    this machine can run it (no runner for the runtime on this device kind, runtime not installed, no GPU, no device
    attached)."""
    if isinstance(exc, (MissingExtra, _Unavailable)):
        return str(exc)
    if kind == "profile" and isinstance(exc, UserError):
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------------------------
# State and run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load_state(path: Path, cfg: ExperimentConfig) -> dict:
    if not path.exists():
        return {"format": STATE_FORMAT, "experiment": cfg.name, "steps": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); remove it to start the experiment over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("steps"), dict):
        raise UserError(f"{path} is not an experiment state file of format {STATE_FORMAT}; remove it to start over")
    return state


def _save_state(path: Path, state: dict) -> None:
    state["updated"] = _now()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


@contextmanager
def _locked(root: Path):
    """One run per output directory at a time."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with (root / ".lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{root} is in use by another experiment run; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class _Run:
    def __init__(self, cfg: ExperimentConfig, steps: list[Step], quiet: bool, command: str):
        from rich.console import Console

        self.cfg, self.steps, self.quiet, self.command = cfg, steps, quiet, command
        self.path = cfg.out / STATE_FILE
        self.state = _load_state(self.path, cfg)
        self.records: dict = self.state["steps"]
        from hpqdeploy.artifact import environment

        # how the latest run was made; each step's own provenance is in its output directory
        self.state.update(experiment=cfg.name, config=str(cfg.path), command=command, settings=cfg.settings(),
                          environment=environment())
        self.results: dict[str, dict] = {}
        self.console = Console(stderr=True, highlight=False)

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, soft_wrap=True)

    def save(self) -> None:
        _save_state(self.path, self.state)

    def result(self, step: Step, status: str, record: dict) -> dict:
        res = {"status": status, "seconds": record.get("seconds"), "hash": step.hash, "output": str(step.output),
               "reason": record.get("reason")}
        self.results[step.name] = res
        return res

    def run(self) -> dict:
        start = time.time()
        for i, step in enumerate(self.steps, 1):
            res = self.execute(step, f"[{i}/{len(self.steps)}]")
            line = f"{f'[{i}/{len(self.steps)}]':>9} {step.name}: {res['status']}"
            if res["status"] == "skipped":
                line += f" ({res['reason']})"
            elif res["status"] == "ran":
                line += f" in {res['seconds']:.1f} s"
            self.say(line)
        counts = {s: sum(r["status"] == s for r in self.results.values()) for s in ("ran", "cached", "skipped")}
        return {"experiment": self.cfg.name, "config": str(self.cfg.path), "out": str(self.cfg.out),
                "state": str(self.path), "seconds": round(time.time() - start, 1), "counts": counts,
                "steps": self.results}

    def execute(self, step: Step, position: str) -> dict:
        record = self.records.get(step.name)
        done_deps = [d for d in step.deps if self.results[d]["status"] != "skipped"]
        if step.kind == "report":
            step.hash = step_hash("report", step.settings,
                                  [[d, self.results[d]["hash"], d in done_deps] for d in step.deps])
        else:
            missing = [d for d in step.deps if d not in done_deps]
            if missing:
                return self.skip(step, f"needs {missing[0]}, which was skipped")
        inputs = {d: self.records[d]["run"] for d in done_deps}
        if step.kind == "report" and not done_deps:
            return self.skip(step, "nothing finished to report on")
        if step.action is None:  # an existing baseline directory: its fingerprint is its identity
            rec = {"hash": step.hash, "output": str(step.output), "external": True, "status": "done",
                   "run": step.hash[:16], "inputs": {}, "seconds": 0.0, "finished": _now()}
            unchanged = record is not None and record.get("hash") == step.hash
            self.records[step.name] = record if unchanged else rec
            self.save()
            return self.result(step, "cached", self.records[step.name])
        rel = _relative(step.output, self.cfg.out)
        if (record and record.get("status") == "done" and record.get("hash") == step.hash
                and record.get("inputs") == inputs and record.get("output") == rel
                and (step.output / MARKERS[step.kind]).is_file()):
            return self.result(step, "cached", record)
        resume = bool(record and record.get("status") in UNFINISHED and record.get("hash") == step.hash
                      and record.get("inputs") == inputs)
        self.clear(step, record, resume)
        self.records[step.name] = {"hash": step.hash, "output": rel, "status": "running", "inputs": inputs,
                                   "started": _now(), "resumed": resume}
        self.save()
        self.say(f"{position:>9} {step.name}: {'resuming' if resume else 'running'}")
        t0 = time.time()
        try:
            if step.kind == "report":
                step.action(step.output, resume, done_deps)
            else:
                step.action(step.output, resume)
        except KeyboardInterrupt:
            self.finish(step, "interrupted", t0, reason="interrupted (Ctrl-C)")
            raise
        except Exception as exc:  # noqa: BLE001 - classified, recorded, then re-raised as one line
            reason = environment_reason(step.kind, exc)
            if reason is not None:
                shutil.rmtree(_partial(step.output), ignore_errors=True)
                rec = self.finish(step, "skipped", t0, reason=reason)
                return self.result(step, "skipped", rec)
            message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            message = (message.splitlines() or [type(exc).__name__])[0]
            self.finish(step, "failed", t0, reason=message)
            raise UserError(f"{self.cfg.path.name}: step {step.name} failed: {message} (finished steps are kept in "
                            f"{self.path}; run again to continue)") from exc
        rec = self.finish(step, "done", t0)
        return self.result(step, "ran", rec)

    def clear(self, step: Step, record: dict | None, resume: bool) -> None:
        """Remove a stale output before a step re-runs; only ever one this experiment wrote."""
        if step.output.exists():
            if record is None or record.get("output") != _relative(step.output, self.cfg.out):
                raise UserError(f"{step.output} exists but {self.path} did not write it; remove it or choose "
                                "another [experiment] out")
            shutil.rmtree(step.output)
        if not resume:
            shutil.rmtree(_partial(step.output), ignore_errors=True)

    def finish(self, step: Step, status: str, t0: float, reason: str | None = None) -> dict:
        rec = self.records[step.name]
        rec.update(status=status, seconds=round(time.time() - t0, 1), finished=_now(), reason=reason)
        if status == "done":
            rec["run"] = uuid.uuid4().hex[:16]  # what the steps downstream were made from
        self.save()
        return rec

    def skip(self, step: Step, reason: str) -> dict:
        old = self.records.get(step.name, {})
        self.records[step.name] = {**old, "hash": step.hash, "status": "skipped", "reason": reason,
                                   "output": old.get("output", _relative(step.output, self.cfg.out)),
                                   "seconds": 0.0, "finished": _now()}
        self.save()
        return self.result(step, "skipped", self.records[step.name])


def run_experiment(config: Path, out: Path | None = None, quiet: bool = False, command: str = "") -> dict:
    """Run (or continue) the experiment described by `config`; `out` overrides its [experiment] out.

    Returns {"experiment", "config", "out", "state", "seconds", "counts": {ran, cached, skipped},
    "steps": {name: {"status": "ran" | "cached" | "skipped", "seconds", "hash", "output", "reason"}}}.
    """
    cfg = load_config(config)
    if out is not None:
        cfg = replace(cfg, out=Path(out).expanduser().resolve())
    steps = plan_steps(cfg, quiet, command)
    with _locked(cfg.out):
        return _Run(cfg, steps, quiet, command).run()


def summary_table(summary: dict):
    """The summary as a rich table: one row per step."""
    from rich.table import Table

    table = Table(title=f"experiment {summary['experiment']} → {summary['out']}")
    for c in ("step", "status", "seconds", "output / reason"):
        table.add_column(c, justify="right" if c == "seconds" else "left")
    for name, r in summary["steps"].items():
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        detail = r["reason"] if r["status"] == "skipped" else _relative(Path(r["output"]), Path(summary["out"]))
        table.add_row(name, r["status"], seconds, detail)
    c = summary["counts"]
    table.caption = f"{c['ran']} ran, {c['cached']} up to date, {c['skipped']} skipped; state: {summary['state']}"
    return table
