"""Every setting is declared once (hpqdeploy.config); the command-line options, the experiment file's keys and the
validation all come from that declaration, and each names the setting the way its user writes it."""

from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from hpqdeploy import config, settings
from hpqdeploy.cli.app import app
from hpqdeploy.cli.options import FLAG_NAMES, build, with_settings
from hpqdeploy.experiment import schema
from hpqdeploy.settings import SettingError, setting

COMMANDS = {"train": (config.DataOptions, config.TrainConfig, config.ModelOptions, config.ComputeOptions),
            "compress": (config.CompressOptions, config.TrainConfig, config.DataOptions, config.ComputeOptions),
            "export": (config.ExportOptions,), "profile": (config.ProfileOptions,),
            "experiment": (config.ComputeOptions,)}
SECTIONS = {"baseline": (config.ModelOptions, config.DataOptions, config.TrainConfig),
            "compress": (config.CompressOptions, config.TrainConfig, config.DataOptions),
            "export": (config.ExportOptions,), "profile": (config.ProfileOptions,)}


def _declared(classes):
    out = {}
    for cls in classes:
        for name, (f, spec) in settings.specs(cls).items():
            out.setdefault(name, (cls, f, spec))
    return out


def _options(command: str) -> dict:
    click_app = typer.main.get_command(app)
    return {p.name: p for p in click_app.commands[command].params}


def _normal(v):
    return list(v) if isinstance(v, tuple) else v


def _out_of_bounds(spec: settings.Spec):
    if spec.gt is not None:
        return spec.gt
    if spec.ge is not None:
        return spec.ge - 1
    if spec.lt is not None:
        return spec.lt
    if spec.le is not None:
        return spec.le + 1
    return None


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_line_option_is_a_declared_setting_with_its_default_and_help(command):
    options = _options(command)
    declared = _declared(COMMANDS[command])
    own = {"model", "baseline", "source", "config", "output", "resume", *FLAG_NAMES}
    for name, opt in options.items():
        if name in own:
            continue
        assert name in declared, f"{command} --{name} is not a declared setting"
        cls, f, spec = declared[name]
        assert "cli" in spec.surfaces
        assert opt.opts == [settings.cli_name(settings.key_of(f, spec))]
        if not opt.required:
            assert _normal(opt.default) == _normal(settings.default_of(f)), name
        assert spec.help and spec.help in (opt.help or "")


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_experiment_key_is_a_declared_setting_with_its_default(section):
    keys = schema.SECTIONS[section]
    own = {"dir", "targets", "batch_sizes"}
    declared = {settings.key_of(f, spec): (cls, f, spec) for cls in SECTIONS[section]
                for _, (f, spec) in settings.specs(cls).items() if "toml" in spec.surfaces}
    for key, k in keys.items():
        if key in own:
            continue
        assert key in declared, f"[{section}] {key} is not a declared setting"
        _, f, _ = declared[key]
        default = settings.default_of(f)
        assert _normal(k.default) == _normal(None if default == "" else default), key


@pytest.mark.parametrize("cls", config.STAGES, ids=lambda c: c.__name__)
def test_bounds_are_enforced_alike_on_every_surface(cls, tmp_path):
    """One out-of-range value per bounded setting: Python names it `name`, the experiment file `section.key`, the
    command line `--key`."""
    hints = settings.field_types(cls)
    for name, (f, spec) in settings.specs(cls).items():
        bad = _out_of_bounds(spec)
        if bad is None:
            continue
        scalar, _, sequence = settings.base_type(hints[name])
        value = scalar(bad)
        value = [value] if sequence else value
        with pytest.raises(SettingError) as err:
            settings.check_value(name, value, spec, hints[name])
        assert str(err.value).startswith(f"{name} must be")
        key = settings.key_of(f, spec)
        assert err.value.render(settings.cli_name).startswith(f"--{key.replace('_', '-')} must be")
        for section, classes in SECTIONS.items():
            if cls in classes and key in schema.SECTIONS[section]:
                problem = schema.SECTIONS[section][key].check(value)
                assert problem and problem == err.value.problem, (section, key)


def test_a_setting_given_wrong_on_the_command_line_is_named_as_written(tmp_path):
    result = CliRunner().invoke(app, ["compress", str(tmp_path), "-o", str(tmp_path / "o"), "--prune-ratio", "1.5"],
                                standalone_mode=False)
    assert isinstance(result.exception, SettingError)
    assert result.exception.render(settings.cli_name) == "--prune-ratio must be in (0, 1), got 1.5"


def test_changing_a_default_in_its_one_place_changes_all_three():
    """A toy stage declared twice, with different defaults: the option, the experiment key and the validation each
    follow the declaration."""
    for default in (3, 5):
        @dataclass(frozen=True)
        class Toy:
            width: int = setting(default, "channels", ge=2)

            def __post_init__(self):
                settings.validate(self)

        toy_app = typer.Typer()

        @toy_app.command()
        @with_settings(Toy)
        def run(**options):
            print(build(Toy, options).width)

        result = CliRunner().invoke(toy_app, [])
        assert result.output.strip() == str(default)
        assert schema.declared(Toy)["width"].default == default
        assert Toy().width == default
        with pytest.raises(SettingError, match="width must be >= 2, got 1"):
            Toy(width=1)
        result = CliRunner().invoke(toy_app, ["--width", "1"], standalone_mode=False)
        assert result.exception.render(settings.cli_name) == "--width must be >= 2, got 1"
