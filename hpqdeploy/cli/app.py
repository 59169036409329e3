"""`hpqdeploy`: thin commands over the library; every user error is one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException

from hpqdeploy import settings
from hpqdeploy.cli.library_output import held_back
from hpqdeploy.cli.options import Flags, build, with_settings
from hpqdeploy.config import (CompressOptions, ComputeOptions, DataOptions, ExportOptions, ModelOptions, ProfileOptions,
                              TrainConfig)
from hpqdeploy.errors import UserError
from hpqdeploy.settings import SettingError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid pruning + adaptive quantization for edge runtimes.")
console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 140)


def _command() -> str:
    return shlex.join(["hpqdeploy", *sys.argv[1:]])


def _emit(result, flags: Flags, *tables) -> None:
    """The command's result, after its work: one JSON document, or its tables (nothing with --quiet)."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return
    if flags.as_json:
        typer.echo(json.dumps(result, indent=2))
    elif not flags.quiet:
        for table in tables:
            out_console.print(table)


def _note(text: str, flags: Flags) -> None:
    """A line for people on stderr (where a file was written), unless --json or --quiet."""
    if not (flags.as_json or flags.quiet) and os.environ.get("RANK", "0") == "0":
        console.print(escape(text), highlight=False, soft_wrap=True)


@app.command()
@with_settings(DataOptions, TrainConfig, ModelOptions, ComputeOptions, exclude=("distill", "temperature"),
               required=("name",))
def train(
    model: str = typer.Argument(..., help=settings.specs(ModelOptions)["model"][1].help),
    output: Path = typer.Option(..., "-o", "--output", help="output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last epoch"),
    flags: Flags = Flags(),
    **options,
):
    """Step 1: train or fine-tune a baseline and record its accuracy, parameters, MACs and bytes."""
    from hpqdeploy.cli.tables import comparison_table

    cfg, data = build(TrainConfig, options), build(DataOptions, options)
    m = build(ModelOptions, options, model=model)
    with held_back(flags.verbose, flags.as_json):
        from hpqdeploy.pipeline import run_train

        metrics = run_train(model, data, output, cfg, Path(m.weights) if m.weights else None, m.max_length,
                            flags.quiet, resume, _command(), m.scratch, m.dropout, build(ComputeOptions, options))
    _emit(metrics, flags, comparison_table([metrics], f"baseline → {output}"))


@app.command()
@with_settings(CompressOptions, TrainConfig, DataOptions, ComputeOptions, exclude=("name", "calib_size"))
def compress(
    baseline: Path = typer.Argument(..., help="a `hpqdeploy train` output directory"),
    output: Path = typer.Option(..., "-o", "--output"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last epoch"),
    flags: Flags = Flags(),
    **options,
):
    """Prune, allocate bits, fine-tune once and evaluate (or either half alone)."""
    from hpqdeploy.cli.tables import comparison_table

    opts = build(CompressOptions, options, train=build(TrainConfig, options))  # the settings first, then files
    given = {k: options[k] for k in ("data_dir", "train_limit", "eval_limit") if options[k] is not None}
    data = build(DataOptions, {}, **{**_baseline_data(baseline), **given})
    with held_back(flags.verbose, flags.as_json):
        from hpqdeploy import artifact
        from hpqdeploy.pipeline import run_compress

        metrics = run_compress(baseline, output, opts, data, flags.quiet, resume, _command(),
                               build(ComputeOptions, options))
        base = artifact.load(baseline).metrics
    _emit(metrics, flags, comparison_table([base, metrics], f"{opts.method} → {output}"))


@app.command()
@with_settings(ExportOptions, required=("target",))
def export(
    source: Path = typer.Argument(..., help="a `hpqdeploy compress` (or `train`) output directory"),
    output: Path = typer.Option(..., "-o", "--output"),
    flags: Flags = Flags(),
    **options,
):
    """Lower to a runtime's native artifact, evaluate it inside the runtime, write export.json."""
    from hpqdeploy.cli.tables import export_table

    opts = build(ExportOptions, options)
    with held_back(flags.verbose, flags.as_json):
        from hpqdeploy.lower.export import run_export

        report = run_export(source, output, opts, flags.quiet, _command())
    _emit(report, flags, export_table(report))


@app.command()
@with_settings(ProfileOptions)
def profile(
    source: Path = typer.Argument(..., help="a `hpqdeploy export` output directory"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for profile.json"),
    flags: Flags = Flags(),
    **options,
):
    """Latency percentiles, throughput, memory and energy of an exported artifact on a device."""
    from hpqdeploy.cli.tables import profile_table

    opts = build(ProfileOptions, options)
    with held_back(flags.verbose, flags.as_json):
        from hpqdeploy.device.profile import run_profile

        result = run_profile(source, output, opts, command=_command())
    if flags.as_json:
        result = {k: v for k, v in result.items() if k != "repeats"}
    _emit(result, flags, profile_table(result))


@app.command()
@with_settings()
def report(
    dirs: list[Path] = typer.Argument(..., help="compress/train, export and profile output directories (or parents)"),
    output: Path = typer.Option(..., "-o", "--output"),
    html: bool = typer.Option(False, "--html", help="also one self-contained report.html"),
    flags: Flags = Flags(),
):
    """The comparison table (per method and runtime) and the pictures: accuracy vs bytes and vs latency, per-layer
    plan."""
    with held_back(flags.verbose, flags.as_json):
        from hpqdeploy.reporting import run_report

        result = run_report(dirs, output, html)
    _emit(result, flags, escape(f"wrote {output}/report.md" + (f" and {output}/report.html" if html else "")))


@app.command()
@with_settings(ComputeOptions)
def experiment(
    config: Path = typer.Argument(..., help="an experiment TOML (see experiments/)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="default: [experiment] out"),
    flags: Flags = Flags(),
    **options,
):
    """The plan from one file: baseline, methods, exports, profiles, report; finished steps are skipped on a re-run."""
    from hpqdeploy.experiment import run_experiment, summary_table

    compute = build(ComputeOptions, options)
    with held_back(flags.verbose, flags.as_json):
        summary = run_experiment(config, output, flags.quiet, _command(), compute)
    _emit(summary, flags, summary_table(summary))


@app.command()
@with_settings()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output"),
    epochs: int = typer.Option(3, "--epochs", help="fine-tuning epochs per method (the baseline trains 4x as many)"),
    flags: Flags = Flags(),
):
    """The embedded default end to end: ResNet-20 on scikit-learn's digits, baseline, the three methods, export to
    the installed runtimes, profile on this CPU, report; last, the table per runtime. Re-run to continue an
    interrupted demo."""
    from hpqdeploy.cli.tables import comparison_table, runtime_tables
    from hpqdeploy.experiment.run import summary_table

    with held_back(flags.verbose, flags.as_json):
        from hpqdeploy.demo import run_demo, runtime_comparison

        results, summary = run_demo(output, epochs, flags.quiet)
        runtimes = runtime_comparison(summary)
    if not (flags.as_json or flags.quiet):
        console.print(summary_table(summary))
    report = Path(summary["out"]) / "report" / "report.md"
    if report.exists():
        _note(f"report: {report} (and report.html beside it)", flags)
    _emit(results, flags, comparison_table(results, f"digits / resnet20, {epochs} epochs per method in PyTorch"),
          *runtime_tables(runtimes))


def _baseline_data(baseline: Path) -> dict:
    plan = baseline / "plan.json"
    if not plan.is_file():
        raise UserError(f"{baseline} is not a `hpqdeploy train` output (no plan.json)")
    try:
        return json.loads(plan.read_text())["data"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{plan} is corrupt ({exc})") from None


def _leave_process_group() -> None:
    """Under torchrun: every rank finished; leave the process group cleanly."""
    if "torch.distributed" in sys.modules:
        from hpqdeploy.training import distributed

        distributed.finish()


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that the command unwinds as it does on Ctrl-C."""


def _terminate(_signum, _frame) -> None:
    raise Terminated()


RESUMABLE = ("train", "compress")


def _interrupted(code: int) -> None:
    """One line, and the shell's exit code for the signal (130 SIGINT, 143 SIGTERM); the output directory is only
    ever complete when renamed into place, so what is left is a `.partial` directory."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if command in RESUMABLE:
        hint = "the last finished epoch is kept; run the same command with --resume to continue"
    elif command == "experiment":
        hint = "run the same command again to continue from the last finished step"
    else:
        hint = "nothing was written; run the command again"
    console.print(f"interrupted: {hint}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C into Exit(130), which it *returns* in this mode
        _leave_process_group()
        if code == 130:
            _interrupted(130)
        if isinstance(code, int) and code:
            sys.exit(code)
    except SettingError as exc:  # a setting given on the command line: named as it was written there
        console.print(f"[red]error:[/red] {escape(exc.render(settings.cli_name))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted(130)
    except Terminated:
        _interrupted(143)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:  # usage errors (typer raises its own bundled click's exceptions): one line too
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        message = " ".join(exc.format_message().split())
        console.print(f"[red]error:[/red] {escape(message)}{hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
