"""What an experiment file may say: each section's keys with their kind, default, choices and range."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Key:
    kind: str  # int | float | str | bool | path | ints | strs
    default: Any = None  # None: not set (the stage's own default applies)
    choices: Callable[[], list[str]] | tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None


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


def _between(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check


def _positive(v):
    return None if v > 0 else "must be > 0"


def _nonempty(v):
    return None if v else "must not be empty"


def _names_in(module: str, attr: str) -> Callable[[], list[str]]:
    """The names `module.attr` lists (its result if it is a function), imported only when first asked for."""
    def names() -> list[str]:
        found = getattr(importlib.import_module(module), attr)
        return list(found() if callable(found) else found)
    return names


method_names = _names_in("hpqdeploy.pipeline", "METHODS")
_runtimes = _names_in("hpqdeploy.lower.base", "runtime_names")

EXPERIMENT = {"name": Key("str", check=_nonempty), "out": Key("path"), "seed": Key("int", 0)}
TRAIN = {"epochs": Key("int", 10, check=_at_least(0)), "lr": Key("float", 1e-3, check=_positive),
         "weight_decay": Key("float", 1e-4, check=_at_least(0)), "batch_size": Key("int", check=_at_least(1)),
         "optimizer": Key("str", "adam", choices=_names_in("hpqdeploy.finetune", "OPTIMIZERS")),
         "warmup": Key("float", 0.0, check=_at_least(0)), "mixup": Key("float", 0.0, check=_at_least(0)),
         "train_limit": Key("int", check=_at_least(1)), "eval_limit": Key("int", check=_at_least(1))}
BASELINE = {"model": Key("str", check=_nonempty), "weights": Key("path"), "scratch": Key("bool", False),
            "dir": Key("path"), "data": Key("str", choices=_names_in("hpqdeploy.data", "dataset_names")),
            "data_dir": Key("path"), "calib_size": Key("int", 512, check=_at_least(1)),
            "max_length": Key("int", 64, check=_at_least(1)),
            "dropout": Key("float", check=_between(0, 1, hi_open=True)), **TRAIN}
BASELINE_DIR_KEYS = ("dir", "data_dir")  # with `dir` the baseline exists; only where its data lives may change
METHODS = Key("strs", choices=method_names, check=_nonempty)  # compress.methods
COMPRESS = {"prune_ratio": Key("float", 0.3, check=_between(0, 1, True, True)),
            "bits": Key("ints", [8, 4], check=_nonempty), "low_bit_share": Key("float", 0.5, check=_between(0, 1)),
            "act_bits": Key("int", 8, check=_between(0, 8)),
            "importance": Key("str", "taylor", choices=_names_in("hpqdeploy.importance", "CRITERIA")),
            "target": Key("str", choices=_names_in("hpqdeploy.targets", "target_names")),
            "calib_batches": Key("int", 8, check=_at_least(1)),
            "fade": Key("float", 0.0, check=_between(0, 1, hi_open=True)), "reconstruct": Key("bool", False),
            "distill": Key("float", 0.9, check=_between(0, 1, hi_open=True)),
            "temperature": Key("float", 4.0, check=_positive), **TRAIN}
EXPORT = {"targets": Key("strs", choices=_runtimes, check=_nonempty),
          "mixed": Key("str", "split", choices=_names_in("hpqdeploy.lower.legalize", "MIXED_MODES")),
          "batch_size": Key("int", 32, check=_at_least(1)), "eval_limit": Key("int", check=_at_least(1)),
          "calib_batches": Key("int", 8, check=_at_least(1)), "threads": Key("int", 1, check=_at_least(1)),
          "overflow_fix": Key("str", "auto", choices=_names_in("hpqdeploy.lower.legalize", "OVERFLOW_FIX"))}
PROFILE = {"device": Key("str", "x86", choices=_names_in("hpqdeploy.device_profiles", "profile_names")),
           "targets": Key("strs", choices=_runtimes),
           "batch_sizes": Key("ints", [1], check=lambda v: _nonempty(v) or _at_least(1)(v)),
           "iters": Key("int", 200, check=_at_least(1)), "repeats": Key("int", 3, check=_at_least(1)),
           "warmup": Key("int", 20, check=_at_least(0)), "threads": Key("int", 1, check=_at_least(1)),
           "min_seconds": Key("float", 0.0, check=_at_least(0)), "idle_seconds": Key("float", 2.0, check=_at_least(0)),
           "runner": Key("str", choices=_names_in("hpqdeploy.runners.base", "runner_names")), "meter": Key("str"),
           "pin_clocks": Key("bool", False), "serial": Key("str")}
REPORT = {"html": Key("bool", False)}
SECTIONS = {"experiment": EXPERIMENT, "baseline": BASELINE, "compress": COMPRESS, "export": EXPORT,
            "profile": PROFILE, "report": REPORT}
