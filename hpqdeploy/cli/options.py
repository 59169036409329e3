"""Command-line options made from the settings' declarations (`hpqdeploy.config`): a command lists the
configuration classes it takes and gets one `--option` per setting, with the declared default and help text, and
the flags every command takes (`Flags`: --json, --quiet, --verbose)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import typer

from hpqdeploy import settings


def _flag(option: str, text: str):
    return field(default=False, metadata={"option": option, "help": text})


@dataclass(frozen=True)
class Flags:
    """How a command speaks: the flags every command takes, with the same meaning everywhere."""

    as_json: bool = _flag("--json", "print the result as one JSON document on stdout, and nothing else there")
    quiet: bool = _flag("--quiet", "no progress and no tables: only errors")
    verbose: bool = _flag("--verbose", "also show what the runtimes and other libraries print (held back otherwise, "
                                       "and shown when a step fails)")


FLAG_NAMES = tuple(f.name for f in fields(Flags))
FLAGS_LAST = ("resume", *FLAG_NAMES)  # the command's own flags stay at the end of --help


def _annotation(hint) -> Any:
    scalar, optional, sequence = settings.base_type(hint)
    if sequence:
        return list[scalar]
    return Optional[scalar] if optional else scalar


def option_fields(*groups: type, exclude: tuple[str, ...] = ()) -> dict[str, tuple[type, Any, settings.Spec]]:
    """Field name -> (class, field, spec) of every setting the groups offer on the command line."""
    out = {}
    for cls in groups:
        for name, (f, spec) in settings.specs(cls).items():
            if "cli" in spec.surfaces and name not in exclude and name not in out:
                out[name] = (cls, f, spec)
    return out


def _flag_parameters(taken: set[str]) -> list[inspect.Parameter]:
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                              default=typer.Option(False, f.metadata["option"], help=f.metadata["help"]))
            for f in fields(Flags) if f.name not in taken]


def with_settings(*groups: type, exclude: tuple[str, ...] = (), required: tuple[str, ...] = ()):
    """Give a Typer command one option per setting of `groups` (except `exclude`); the command receives them as
    keyword arguments (use `build`). `required` settings have no default on the command line.

    Every command also gets the shared flags (`Flags`): a command with a `flags` parameter receives them as one
    `Flags`, any other as keyword arguments."""
    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        bundled = "flags" in sig.parameters
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "flags"]
        taken = {p.name for p in own}
        added = []
        for name, (cls, f, spec) in option_fields(*groups, exclude=exclude).items():
            if name in taken:
                continue
            hint = settings.field_types(cls)[name]
            default = settings.default_of(f)
            if isinstance(default, tuple):
                default = list(default)
            option = typer.Option(... if name in required else default, settings.cli_name(settings.key_of(f, spec)),
                                  help=spec.help_text(), show_default=default not in (None, "", []))
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=_annotation(hint)))
        first = [p for p in own if p.name not in FLAGS_LAST]
        last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name in FLAGS_LAST]
        last += _flag_parameters(taken)
        first = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                 else p for p in first]

        @functools.wraps(fn)
        def command(**kwargs):
            if bundled:
                kwargs["flags"] = Flags(**{name: kwargs.pop(name) for name in FLAG_NAMES})
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=[*first, *added, *last])
        command.__annotations__ = {p.name: p.annotation for p in [*first, *added, *last]}
        return command

    return decorate


def build(cls: type, values: dict, **overrides):
    """An instance of a configuration class from the command's keyword arguments (those that are its fields)."""
    names = set(settings.specs(cls)) | set(overrides)
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
