"""Command-line options made from the settings' declarations (`hpqdeploy.config`): a command lists the
configuration classes it takes and gets one `--option` per setting, with the declared default and help text."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer

from hpqdeploy import settings

FLAGS_LAST = ("resume", "as_json", "quiet", "verbose")  # the command's own flags stay at the end of --help


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


def with_settings(*groups: type, exclude: tuple[str, ...] = (), required: tuple[str, ...] = ()):
    """Give a Typer command one option per setting of `groups` (except `exclude`); the command receives them as
    keyword arguments (use `build`). `required` settings have no default on the command line."""
    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
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
        first = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                 else p for p in first]

        @functools.wraps(fn)
        def command(**kwargs):
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
