"""What an experiment file may say: each section's keys with their kind, default, choices and range.

The stages' settings come from their one declaration in `hpqdeploy.config`; only the experiment's own keys (its
name, where it writes, which methods, targets and batch sizes) are declared here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from hpqdeploy import config, settings


@dataclass(frozen=True)
class Key:
    kind: str  # int | float | str | bool | path | ints | strs
    default: Any = None  # None: not set (the stage's own default applies)
    choices: Callable[[], list[str]] | tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    field: str | None = None  # the configuration field it sets (derived keys), see `hpqdeploy.config`


KINDS = {"int": "an integer", "float": "a number", "str": "a string", "path": "a path (string)",
         "bool": "true or false", "ints": "a list of integers", "strs": "a list of strings"}


def has_kind(value, kind: str) -> bool:
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


def _at_least(n):
    return lambda v: None if min(v if isinstance(v, list) else [v]) >= n else f"must be >= {n}"


def _nonempty(v):
    return None if v else "must not be empty"


_KIND_OF = {int: "int", float: "float", str: "str", bool: "bool"}
PATH_KEYS = ("weights", "data_dir")  # strings read as paths relative to the experiment file


def _declared_check(name: str, spec: settings.Spec, hint) -> Callable[[Any], str | None]:
    """The declaration's bounds and choices as a check that returns what is wrong (the kind is checked first)."""
    def check(value) -> str | None:
        try:
            settings.check_value(name, value, spec, hint)
        except settings.SettingError as exc:
            return exc.problem
        return None
    return check


def declared(cls, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> dict[str, Key]:
    """The experiment-file keys of a configuration class: its settings that files may set, under their names."""
    hints = settings.field_types(cls)
    keys = {}
    for name, (f, spec) in settings.specs(cls).items():
        if "toml" not in spec.surfaces or name in exclude or (only is not None and name not in only):
            continue
        scalar, _, sequence = settings.base_type(hints[name])
        kind = _KIND_OF[scalar] + ("s" if sequence else "")
        key = settings.key_of(f, spec)
        if key in PATH_KEYS:
            kind = "path"
        default = settings.default_of(f)
        default = None if default == "" else default  # a string the stage needs: not set until the file sets it
        keys[key] = Key(kind, list(default) if isinstance(default, tuple) else default, None,
                        _declared_check(name, spec, hints[name]), field=name)
    return keys


def method_names() -> list[str]:
    return list(config.METHODS)


_runtimes = config.names_in("hpqdeploy.lower.base", "runtime_names")
_seed = settings.specs(config.TrainConfig)["seed"][0]

# The experiment's own keys (everything else is declared once in hpqdeploy.config and derived here).
EXPERIMENT = {"name": Key("str", check=_nonempty), "out": Key("path"), "seed": Key("int", _seed.default)}
_DATA = declared(config.DataOptions, exclude=("name", "data_dir", "calib_size"))  # train_limit, eval_limit
TRAIN = {**declared(config.TrainConfig, exclude=("distill", "temperature")), **_DATA}
BASELINE = {**declared(config.ModelOptions), "dir": Key("path"),
            **declared(config.DataOptions, only=("name", "data_dir", "calib_size")), **TRAIN}
BASELINE_DIR_KEYS = ("dir", "data_dir")  # with `dir` the baseline exists; only where its data lives may change
METHODS = Key("strs", choices=method_names, check=_nonempty)  # compress.methods
COMPRESS = {**declared(config.CompressOptions), **declared(config.TrainConfig), **_DATA}
EXPORT = {"targets": Key("strs", choices=_runtimes, check=_nonempty), **declared(config.ExportOptions)}
PROFILE = {**declared(config.ProfileOptions), "targets": Key("strs", choices=_runtimes),
           "batch_sizes": Key("ints", [1], check=lambda v: _nonempty(v) or _at_least(1)(v))}
REPORT = {"html": Key("bool", False)}
SECTIONS = {"experiment": EXPERIMENT, "baseline": BASELINE, "compress": COMPRESS, "export": EXPORT,
            "profile": PROFILE, "report": REPORT}
