"""Every user-facing setting is declared once, as a field of a stage's frozen configuration dataclass.

    prune_ratio: float = setting(0.3, "fraction of neurons/channels removed per layer", gt=0, lt=1)

The declaration (name, type, default, help text, bounds, choices) is the only one: the command-line options
(`cli.options`), the experiment file's schema (`experiment.schema`) and validation on construction (`validate`)
all read it. A problem is a `SettingError` naming the setting; each surface names it the way its user wrote it:
`prune_ratio` in Python, `--prune-ratio` on the command line, `compress.hybrid.prune_ratio` in an experiment file.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Sequence

from hpqdeploy.errors import UserError


@dataclass(frozen=True)
class Spec:
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Callable[[], Sequence[str]] | tuple[str, ...] | None = None
    key: str | None = None  # the name on the command line and in files, where it differs from the field's
    experimental: bool = False  # kept for studies; measured not to help on the benchmarks
    surfaces: tuple[str, ...] = ("cli", "toml")  # where a user can set it (Python: always)

    def choice_list(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def bounds(self) -> str | None:
        """The allowed range in interval notation, e.g. `(0, 1)`, `>= 1`."""
        lo = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return None

    def help_text(self) -> str:
        text = ("experimental: " if self.experimental else "") + self.help
        return text


def _num(v: float) -> str:
    return f"{v:g}"


def setting(default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None,
            **spec) -> Any:
    """A dataclass field that is a user-facing setting (see the module's docstring)."""
    meta = {"setting": Spec(help, **spec)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


class SettingError(UserError):
    """A setting's value is wrong. `problem` may name other settings as `{name}`; `render` spells them for a
    surface."""

    def __init__(self, name: str, problem: str, value: Any = MISSING, key: str | None = None):
        self.name, self.problem, self.value, self.key = name, problem, value, key or name
        super().__init__(self.render(python_name))

    def render(self, namer: Callable[[str], str]) -> str:
        got = "" if self.value is MISSING else f", got {_show(self.value)}"
        names = _Names(namer)
        return f"{namer(self.key)} {self.problem.format_map(names)}{got}"


class _Names(dict):
    def __init__(self, namer):
        super().__init__()
        self.namer = namer

    def __missing__(self, key):
        return self.namer(key)


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def python_name(key: str) -> str:
    return key


def cli_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def toml_name(section: str) -> Callable[[str], str]:
    return lambda key: f"{section}.{key}"


def specs(cls) -> dict[str, tuple[Any, Spec]]:
    """Field name -> (field, Spec) for the settings a configuration class declares, in declaration order."""
    return {f.name: (f, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata}


def key_of(f, spec: Spec) -> str:
    return spec.key or f.name


def default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(hint) -> tuple[type, bool, bool]:
    """(scalar type, optional, a sequence) of a field's type hint: `int | None` -> (int, True, False),
    `tuple[int, ...]` -> (int, False, True)."""
    optional = False
    args = typing.get_args(hint)
    if args and type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return args[0], optional, True
    return hint, optional, False


def check_value(name: str, value: Any, spec: Spec, hint, key: str | None = None) -> None:
    """Type, bounds and choices of one value; a SettingError naming it."""
    scalar, optional, sequence = base_type(hint)
    if value is None:
        if optional:
            return
        raise SettingError(name, "must be set", key=key)
    values = value if sequence else [value]
    if sequence and not isinstance(value, (list, tuple)):
        raise SettingError(name, f"must be a list of {_KIND[scalar]}s", value, key)
    for v in values:
        if not _is(v, scalar):
            raise SettingError(name, f"must be {_ARTICLE[scalar]}", value, key)
        if scalar in (int, float):
            if isinstance(v, float) and not math.isfinite(v):
                raise SettingError(name, "must be a finite number", value, key)
            if (spec.ge is not None and v < spec.ge) or (spec.gt is not None and v <= spec.gt) or \
                    (spec.le is not None and v > spec.le) or (spec.lt is not None and v >= spec.lt):
                bounds = spec.bounds()
                raise SettingError(name, f"must be in {bounds}" if "," in bounds else f"must be {bounds}",
                                   value, key)
        choices = spec.choice_list()
        if choices is not None and v not in choices:
            raise SettingError(name, f"must be one of {', '.join(choices)}", value, key)


_KIND = {int: "integer", float: "number", str: "string", bool: "boolean"}
_ARTICLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is(v, scalar) -> bool:
    if scalar is bool:
        return isinstance(v, bool)
    if scalar is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if scalar is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if scalar is str:
        return isinstance(v, str)
    return True


def validate(obj) -> None:
    """Check every declared setting of a configuration object (called from its `__post_init__`)."""
    hints = field_types(type(obj))
    for name, (f, spec) in specs(type(obj)).items():
        check_value(name, getattr(obj, name), spec, hints[name], key_of(f, spec))


def coerce(obj, **values) -> None:
    """Set fields on a frozen configuration during `__post_init__` (normalised forms: tuples for lists)."""
    for k, v in values.items():
        object.__setattr__(obj, k, v)


def as_surface(exc: SettingError, namer: Callable[[str], str]) -> UserError:
    """The same problem, worded for a surface."""
    return UserError(exc.render(namer))
