"""`hpqdeploy`: thin commands over the library; every user error is one line and a non-zero exit."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException

from hpqdeploy.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid pruning + adaptive quantization for edge runtimes.")
console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 140)
OPTIMIZER_HELP = "adam (the plan's) | sgd (Nesterov momentum 0.9; give it a larger --lr, e.g. 0.01-0.1)"
WARMUP_HELP = "epochs of linear learning-rate warmup before the cosine decay (0: none)"
MIXUP_HELP = "image models: blend training images in pairs, weight ~ Beta(alpha, alpha) (0: off; e.g. 1)"


def _command() -> str:
    return shlex.join(["hpqdeploy", *sys.argv[1:]])


def _emit(result, as_json: bool, table=None) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif table is not None:
        out_console.print(table)


@app.command()
def train(
    model: str = typer.Argument(..., help="registry name (resnet20, mobilenet_v2, minilm, ...), HF dir or module:fn"),
    data: str = typer.Option(..., "--data", help="data set name (cifar10, sst2, digits, ...)"),
    output: Path = typer.Option(..., "-o", "--output", help="output directory"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir"),
    weights: Optional[Path] = typer.Option(None, "--weights",
                                           help="pretrained weights: a state_dict file or .safetensors"),
    scratch: bool = typer.Option(False, "--scratch", help="random initialisation instead of pretrained weights"),
    epochs: int = typer.Option(10, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    warmup: float = typer.Option(0.0, "--warmup", help=WARMUP_HELP),
    optimizer: str = typer.Option("adam", "--optimizer", help=OPTIMIZER_HELP),
    mixup: float = typer.Option(0.0, "--mixup", help=MIXUP_HELP),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 64 for images, 32 for text"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="fine-tune on this many examples"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="evaluate on this many (default: all)"),
    calib_size: int = typer.Option(512, "--calib-size"),
    max_length: int = typer.Option(64, "--max-length", help="text models: tokens per example"),
    dropout: Optional[float] = typer.Option(None, "--dropout",
                                            help="text models: dropout of the classification head (default 0.5)"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Step 1: train or fine-tune a baseline and record its accuracy, parameters, MACs and bytes."""
    from hpqdeploy.finetune import TrainConfig
    from hpqdeploy.pipeline import DataOptions, run_train
    from hpqdeploy.cli.tables import comparison_table

    batch = _default_batch(data) if batch_size is None else batch_size
    cfg = TrainConfig(epochs, lr, weight_decay, batch, seed, warmup=warmup,
                      optimizer=optimizer, mixup=mixup)
    opts = DataOptions(data, data_dir, calib_size, train_limit, eval_limit)
    metrics = run_train(model, opts, output, cfg, weights, max_length, quiet, resume, _command(), scratch, dropout)
    _emit(metrics, as_json, comparison_table([metrics], f"baseline → {output}"))


@app.command()
def compress(
    baseline: Path = typer.Argument(..., help="a `hpqdeploy train` output directory"),
    output: Path = typer.Option(..., "-o", "--output"),
    method: str = typer.Option("hybrid", "--method", help="hybrid | prune | quant"),
    prune_ratio: float = typer.Option(0.3, "--prune-ratio", help="fraction of neurons/channels removed per layer"),
    bits: list[int] = typer.Option([8, 4], "--bits", help="weight bit widths, high and low (repeat the option)"),
    low_bit_share: float = typer.Option(0.5, "--low-bit-share", help="budget: share of weights at the low width"),
    act_bits: int = typer.Option(8, "--act-bits", help="activation bits (0: float activations)"),
    importance: str = typer.Option("taylor", "--importance", help="taylor | magnitude"),
    target: Optional[str] = typer.Option(None, "--target", help="restrict to what this runtime executes"),
    fade: float = typer.Option(0.0, "--fade", help="share of the epochs over which pruned channels fade out "
                                                     "before removal (0: remove at once)"),
    reconstruct: bool = typer.Option(False, "--reconstruct", help="after removing channels, re-fit the layers that "
                                     "read them to the baseline's outputs (least squares on calibration data)"),
    epochs: int = typer.Option(10, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    warmup: float = typer.Option(0.0, "--warmup", help=WARMUP_HELP),
    optimizer: str = typer.Option("adam", "--optimizer", help=OPTIMIZER_HELP),
    mixup: float = typer.Option(0.0, "--mixup", help=MIXUP_HELP),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    distill: float = typer.Option(0.9, "--distill", help="weight of distillation from the baseline (0: off)"),
    temperature: float = typer.Option(4.0, "--temperature", help="distillation temperature"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="default: the baseline's"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last epoch"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Prune, allocate bits, fine-tune once and evaluate (or either half alone)."""
    from hpqdeploy import artifact
    from hpqdeploy.finetune import TrainConfig
    from hpqdeploy.pipeline import CompressOptions, DataOptions, run_compress
    from hpqdeploy.cli.tables import comparison_table

    base_data = _baseline_data(baseline)
    data = DataOptions(**{**base_data, **{k: v for k, v in {"data_dir": data_dir, "train_limit": train_limit,
                                                             "eval_limit": eval_limit}.items() if v is not None}})
    batch = _default_batch(data.name) if batch_size is None else batch_size
    cfg = TrainConfig(epochs, lr, weight_decay, batch, seed, distill, temperature,
                      warmup=warmup, optimizer=optimizer, mixup=mixup)
    opts = CompressOptions(method, prune_ratio, tuple(bits), low_bit_share, act_bits or None, importance, target,
                           train=cfg, fade=fade,
                           reconstruct=reconstruct)
    metrics = run_compress(baseline, output, opts, data, quiet, resume, _command())
    base = artifact.load(baseline).metrics
    _emit(metrics, as_json, comparison_table([base, metrics], f"{method} → {output}"))


@app.command()
def export(
    source: Path = typer.Argument(..., help="a `hpqdeploy compress` (or `train`) output directory"),
    target: str = typer.Option(..., "--target", help="tensorrt | openvino | executorch | onnxruntime"),
    output: Path = typer.Option(..., "-o", "--output"),
    mixed: str = typer.Option("split", "--mixed", help="mixed bit widths in one layer: split | layer"),
    batch_size: int = typer.Option(32, "--batch-size", help="evaluation batch"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="default: the one recorded in the artifact"),
    threads: int = typer.Option(1, "--threads"),
    overflow_fix: str = typer.Option("auto", "--overflow-fix",
                                     help="int8 kernels exact on x86 CPUs without VNNI (OpenVINO: 7-bit "
                                          "weights; ONNX Runtime: u8 x u8): auto (this CPU) | on | off"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Lower to a runtime's native artifact, evaluate it inside the runtime, write export.json."""
    from hpqdeploy.export import ExportOptions, run_export
    from hpqdeploy.cli.tables import export_table

    opts = ExportOptions(target, mixed, batch_size, eval_limit, threads=threads, data_dir=data_dir,
                         overflow_fix=overflow_fix)
    report = run_export(source, output, opts, quiet, _command())
    _emit(report, as_json, export_table(report))


@app.command()
def profile(
    source: Path = typer.Argument(..., help="a `hpqdeploy export` output directory"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for profile.json"),
    device: str = typer.Option("x86", "--device", help="device kind: a file in profiles/"),
    runner: Optional[str] = typer.Option(None, "--runner", help="default: the device's runner for the artifact"),
    batch_size: int = typer.Option(1, "--batch-size"),
    threads: int = typer.Option(1, "--threads"),
    warmup: int = typer.Option(20, "--warmup"),
    iters: int = typer.Option(200, "--iters", help="timed calls per repeat"),
    min_seconds: float = typer.Option(0.0, "--min-seconds", help="and at least this long per repeat"),
    repeats: int = typer.Option(3, "--repeats"),
    idle_seconds: float = typer.Option(2.0, "--idle-seconds", help="idle power window (with a meter)"),
    pin_clocks: bool = typer.Option(False, "--pin-clocks", help="run the profile's clock-pinning commands"),
    serial: Optional[str] = typer.Option(None, "--serial", help="adb device serial (android)"),
    meter: Optional[str] = typer.Option(None, "--meter", help="another power meter, e.g. tegrastats on Jetsons"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="default: the one recorded in the artifact"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Latency percentiles, throughput, memory and energy of an exported artifact on a device."""
    from hpqdeploy.profile import ProfileOptions, run_profile
    from hpqdeploy.cli.tables import profile_table

    opts = ProfileOptions(device, runner, batch_size, threads, warmup, iters, min_seconds, repeats, idle_seconds,
                          pin_clocks, serial, data_dir, meter)
    result = run_profile(source, output, opts, command=_command())
    if as_json:
        result = {k: v for k, v in result.items() if k != "repeats"}
    _emit(result, as_json, profile_table(result))


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="compress/train, export and profile output directories (or parents)"),
    output: Path = typer.Option(..., "-o", "--output"),
    html: bool = typer.Option(False, "--html", help="also one self-contained report.html"),
    as_json: bool = typer.Option(False, "--json"),
):
    """The comparison table (per method and runtime) and the pictures: accuracy vs bytes and vs latency, per-layer
    plan."""
    from hpqdeploy.reporting import run_report

    result = run_report(dirs, output, html)
    if as_json:
        _emit(result, True)
    else:
        out_console.print(f"wrote {output}/report.md" + (f" and {output}/report.html" if html else ""))


@app.command()
def experiment(
    config: Path = typer.Argument(..., help="an experiment TOML (see experiments/)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="default: [experiment] out"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """The plan from one file: baseline, methods, exports, profiles, report; finished steps are skipped on a re-run."""
    from hpqdeploy.experiment import run_experiment, summary_table

    summary = run_experiment(config, output, quiet, _command())
    _emit(summary, as_json, summary_table(summary))


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output"),
    epochs: int = typer.Option(3, "--epochs", help="fine-tuning epochs per method (the baseline trains 4x as many)"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """The embedded default end to end: ResNet-20 on scikit-learn's digits, baseline, the three methods, export to
    the installed runtimes, profile on this CPU, report. Re-run to continue an interrupted demo."""
    from hpqdeploy.cli.tables import comparison_table
    from hpqdeploy.demo import run_demo
    from hpqdeploy.experiment.run import summary_table

    results, summary = run_demo(output, epochs, quiet)
    if as_json:
        _emit(results, True, None)
        return
    console.print(summary_table(summary))
    _emit(results, False, comparison_table(results, f"digits / resnet20, {epochs} epochs per method → {output}"))
    report = Path(summary["out"]) / "report" / "report.md"
    if report.exists():
        console.print(f"report: {report} (and report.html beside it)")


def _default_batch(data: str) -> int:
    return 32 if data in ("sst2", "qqp") else 64


def _baseline_data(baseline: Path) -> dict:
    plan = baseline / "plan.json"
    if not plan.is_file():
        raise UserError(f"{baseline} is not a `hpqdeploy train` output (no plan.json)")
    try:
        return json.loads(plan.read_text())["data"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{plan} is corrupt ({exc})") from None


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
        if code == 130:
            _interrupted(130)
        if isinstance(code, int) and code:
            sys.exit(code)
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
