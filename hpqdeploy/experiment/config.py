"""Reading an experiment TOML into an `ExperimentConfig`: every key checked against the schema, defaults filled in.

Every problem is one `UserError` that names the file, the key and the fix. Paths are relative to the file's directory.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hpqdeploy.config import ComputeOptions
from hpqdeploy.errors import UserError
from hpqdeploy.experiment.schema import (BASELINE, BASELINE_DIR_KEYS, COMPRESS, EXPERIMENT, EXPORT, KINDS, METHODS,
                                         PROFILE, REPORT, SECTIONS, Key, has_kind, method_names)
from hpqdeploy.settings import SettingError, key_of, toml_name
from hpqdeploy.settings import specs as settings_specs

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
    compute: ComputeOptions | None = None  # where this run trains (given on the command line, not in the file)

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


def _toml_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> UserError:
        return UserError(f"{self.path}: {message}")

    def table(self, name: str, table) -> dict:
        if not isinstance(table, dict):
            raise self.fail(f"{name} must be a table ([{name}]), got a {_toml_type(table)}")
        return table

    def section(self, name: str, table, schema: dict[str, Key], allow_tables: tuple[str, ...] = ()) -> dict:
        out = {}
        for key, value in self.table(name, table).items():
            if key in allow_tables:
                continue
            if key not in schema:
                known = [*schema, *allow_tables]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {name}.{close[0]}?" if close else f"known: {', '.join(known)}"
                raise self.fail(f"unknown key {name}.{key}; {hint}")
            out[key] = self.value(f"{name}.{key}", value, schema[key])
        return {k: out.get(k, schema[k].default) for k in schema}

    def value(self, where: str, value, key: Key):
        if not has_kind(value, key.kind):
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
    compress = _compress(c, blob["compress"], data) if "compress" in blob else {}
    export = c.section("export", blob["export"], EXPORT) if "export" in blob else None
    if export is not None and not export["targets"]:
        raise c.fail("export.targets is missing: list the runtimes, e.g. targets = [\"onnxruntime\"]")
    profile = None
    if "profile" in blob:
        if export is None:
            raise c.fail("[profile] needs an [export] section: profiles measure exported artifacts")
        profile = _profile(c, blob["profile"], export["targets"])
    report = c.section("report", blob.get("report", {}), REPORT)
    return ExperimentConfig(path, name, out, exp["seed"], baseline, compress, export, profile, report, data)


def _baseline(c: _Checker, table, root: Path) -> tuple[dict, str]:
    settings = c.section("baseline", table, BASELINE)
    if settings["dir"] is not None:
        extra = sorted(set(table) - set(BASELINE_DIR_KEYS))
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
        if settings["weights"] is not None and not (weights := _resolve(root, settings["weights"])).is_file():
            raise c.fail(f"baseline.weights: file {weights} not found")
        _check_model(c, settings["model"], root)
        try:
            train_config(settings, seed=0)
        except SettingError as exc:  # the stage's own checks (warmup against epochs), named by key here
            raise c.fail(exc.render(toml_name("baseline"))) from None
    if settings["data_dir"] is not None and not (data_dir := _resolve(root, settings["data_dir"])).exists():
        raise c.fail(f"baseline.data_dir: {data_dir} does not exist")
    return settings, data


def _compress(c: _Checker, table, data: str) -> dict[str, dict]:
    """Per method its settings: [compress] with [compress.<method>] over it, each checked by the stage itself."""
    c.table("compress", table)
    if "methods" not in table:
        raise c.fail("compress.methods is missing: list the methods to run, e.g. methods = [\"hybrid\"]")
    methods = c.value("compress.methods", table["methods"], METHODS)
    shared = c.section("compress", {k: v for k, v in table.items() if k != "methods"}, COMPRESS,
                       allow_tables=tuple(method_names()))
    for method in method_names():
        if method in table and method not in methods:
            raise c.fail(f"[compress.{method}] is set but {method!r} is not in compress.methods")
    compress = {}
    for method in methods:
        explicit = table.get(method, {})
        own = c.section(f"compress.{method}", explicit, COMPRESS)
        settings = {k: (own[k] if k in explicit else shared[k]) for k in COMPRESS}
        try:
            compress_options(method, settings, seed=0)
        except SettingError as exc:  # the stage's own checks (bits, fading), named by key here
            where = f"compress.{method}" if exc.key in explicit else "compress"
            raise c.fail(exc.render(toml_name(where))) from None
        compress[method] = settings
    return compress


def _profile(c: _Checker, table, exported: list[str]) -> dict:
    settings = c.section("profile", table, PROFILE)
    for t in settings["targets"] or []:
        if t not in exported:
            raise c.fail(f"profile.targets: {t!r} is not in export.targets ({', '.join(exported)})")
    if settings["runner"] is not None:
        from hpqdeploy.device.runners.base import get_runner

        runtime = get_runner(settings["runner"]).runtime
        if any(t != runtime for t in (settings["targets"] or exported)):
            raise c.fail(f"profile.runner {settings['runner']!r} runs only {runtime} artifacts; "
                         f"set profile.targets = [\"{runtime}\"] or remove profile.runner")
    return settings


def local_model(root: Path, name: str) -> Path | None:
    """The directory `baseline.model` names (a Hugging Face model or a `train` output, relative to the file), or
    None for a model name. Registered names win, so a directory that happens to be called `minilm` is not taken."""
    from hpqdeploy.models.registry import is_registered_model

    path = _resolve(root, name)
    if is_registered_model(name) or not path.is_dir():
        return None
    return path if (path / "config.json").is_file() or (path / "plan.json").is_file() else None


def _check_model(c: _Checker, name: str, root: Path) -> None:
    from hpqdeploy.models.registry import model_family

    if local_model(root, name) is not None:
        return
    try:
        model_family(name)
    except UserError as exc:
        raise c.fail(f"baseline.model: {exc}") from None


def fields_of(cls, s: dict) -> dict:
    """The keyword arguments of configuration class `cls` among a section's settings (by key, as declared)."""
    out = {}
    for name, (f, spec) in settings_specs(cls).items():
        key = key_of(f, spec)
        if key in s:
            out[name] = tuple(s[key]) if isinstance(s[key], list) else s[key]
    return out


def train_config(s: dict, seed: int):
    """The `TrainConfig` a section's settings stand for."""
    from hpqdeploy.config import TrainConfig

    return TrainConfig(**{**fields_of(TrainConfig, s), "seed": seed})


def compress_options(method: str, s: dict, seed: int):
    """The `CompressOptions` one method's settings stand for: the training keys plus the method's own."""
    from hpqdeploy.config import CompressOptions

    return CompressOptions(**fields_of(CompressOptions, s), method=method, train=train_config(s, seed))
