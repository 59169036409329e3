import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from hpqdeploy import artifact, atomic
from hpqdeploy.cli.app import app, main
from hpqdeploy.errors import UserError
from hpqdeploy.models.cifar_resnet import CifarResNet
from conftest import SHARED

runner = CliRunner()


def hpqdeploy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed entry point, as a user runs it (`main()` turns a UserError into one line and exit code 2)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "hpqdeploy", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _akamaster_checkpoint(path: Path, depth: int) -> Path:
    """A checkpoint in akamaster's layout (`module.` prefix, no shortcut buffers) for a digits-shaped ResNet."""
    model = CifarResNet(depth, num_classes=10, in_channels=1)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("shortcut.source")}
    torch.save({"best_prec1": 0.0, "state_dict": state}, path)
    return path


def _bad_inputs_in(tmp_path: Path) -> None:
    """The files the bad-input cases name: random bytes, an empty file, a non-artifact, a corrupt plan, a ResNet-56."""
    (tmp_path / "junk.th").write_bytes(random.Random(0).randbytes(4096))  # fixed: reproducible failures
    (tmp_path / "empty.th").write_bytes(b"")
    (tmp_path / "not-an-artifact").mkdir()
    (tmp_path / "not-an-artifact" / "notes.txt").write_text("hello")
    (tmp_path / "broken-plan").mkdir()
    (tmp_path / "broken-plan" / "plan.json").write_text("{not json")
    _akamaster_checkpoint(tmp_path / "resnet56.th", 56)


SHARED_SST2 = SHARED / "data" / "sst2"
TRAIN = ["train", "resnet20", "--data", "digits", "--calib-size", "32", "--train-limit", "64", "--eval-limit", "32",
         "--epochs", "0", "--quiet", "-o", "out"]


def _train(*extra: str, model: str = "resnet20") -> list[str]:
    args = [a if a != "resnet20" else model for a in TRAIN]
    return [*args, *extra]


BAD_INPUTS = {  # case -> (arguments, with "{baseline}" for a good baseline artifact; a fragment of the message)
    "unknown model": (_train(model="resnet21"), "unknown model 'resnet21'"),
    "unknown data": ([a if a != "digits" else "mnist-nosuch" for a in TRAIN], "--data must be one of cifar10, digits"),
    "missing weights": (_train("--weights", "nowhere.th"), "weights file not found: nowhere.th"),
    "corrupt weights": (_train("--weights", "junk.th"), "junk.th"),
    "incompatible weights": (_train("--weights", "resnet56.th"), "does not fit resnet20"),
    "prune ratio 0": (["compress", "{baseline}", "-o", "out", "--prune-ratio", "0"], "--prune-ratio"),
    "prune ratio 1.5": (["compress", "{baseline}", "-o", "out", "--prune-ratio", "1.5"], "--prune-ratio"),
    "fade 1": (["compress", "{baseline}", "-o", "out", "--fade", "1"], "--fade"),
    "fade and reconstruct": (["compress", "{baseline}", "-o", "out", "--fade", "0.3", "--reconstruct"],
                             "does not go with --fade"),
    "bits 9": (["compress", "{baseline}", "-o", "out", "--method", "quant", "--bits", "9"], "--bits"),
    "unknown target": (["compress", "{baseline}", "-o", "out", "--target", "nosuch"],
                       "--target must be one of executorch, onnxruntime"),
    "unknown importance": (["compress", "{baseline}", "-o", "out", "--importance", "nosuch"],
                           "--importance must be one of magnitude, taylor, got 'nosuch'"),
    "unknown method": (["compress", "{baseline}", "-o", "out", "--method", "nosuch"],
                       "--method must be one of hybrid, prune, quant, got 'nosuch'"),
    "baseline is not an artifact": (["compress", "not-an-artifact", "-o", "out"], "not-an-artifact"),
}
# The same contract, checked in-process through main() (no interpreter start-up, so cheaper).
MORE_BAD_INPUTS = {
    "empty weights": (_train("--weights", "empty.th"), "empty.th"),
    "bits the target cannot run": (["compress", "{baseline}", "-o", "out", "--method", "quant", "--bits", "4",
                                    "--target", "tensorrt"], "tensorrt"),
    "low-bit share 2": (["compress", "{baseline}", "-o", "out", "--method", "quant", "--low-bit-share", "2"],
                        "--low-bit-share"),
    "baseline does not exist": (["compress", "nowhere", "-o", "out"], "nowhere"),
    "baseline plan corrupt": (["compress", "broken-plan", "-o", "out"], "corrupt"),
    "distill 1.5": (["compress", "{baseline}", "-o", "out", "--distill", "1.5"], "--distill"),
    "warmup past the epochs": (["compress", "{baseline}", "-o", "out", "--warmup", "10"], "--warmup"),
    "negative warmup": (_train("--warmup", "-1"), "--warmup"),
    "negative mixup": (["compress", "{baseline}", "-o", "out", "--mixup", "-1"], "--mixup"),
    "unknown optimizer": (["compress", "{baseline}", "-o", "out", "--optimizer", "lamb"], "--optimizer"),
    "dropout on an image model": (_train("--dropout", "0.1"), "not a text model"),
    "hybrid with bits 9": (["compress", "{baseline}", "-o", "out", "--bits", "9", "--epochs", "0"], "--bits"),
    "factory not importable": (["train", "nosuch_pkg_xyz.models:build", "--data", "digits", "-o", "out"],
                               "must be importable from here (on PYTHONPATH, or an installed package)"),
    "factory without the function": (["train", "json:no_such_fn", "--data", "digits", "-o", "out"],
                                     "module json has no function 'no_such_fn'"),
    "three bit widths": (["compress", "{baseline}", "-o", "out", "--bits", "8", "--bits", "4", "--bits", "2"],
                         "--bits takes one or two widths"),
    "train limit 0": (_train("--train-limit", "0"), "--train-limit must be >= 1"),
    "eval limit 0": (_train("--eval-limit", "0"), "--eval-limit must be >= 1"),
    "calib size 0": (_train("--calib-size", "0"), "--calib-size must be >= 1"),
    "batch size 0": (_train("--batch-size", "0"), "--batch-size"),
    "compress train limit 0": (["compress", "{baseline}", "-o", "out", "--train-limit", "0"], "--train-limit"),
    "output under a file": (_train("-o", "empty.th/out"), "empty.th is a file, not a directory"),
    "image model, text data": (["train", "resnet8", "--data", "sst2", "--data-dir", str(SHARED_SST2), "-o", "out"],
                               "resnet8 is an image model; sst2 is text data"),
}


def _check_one_line(code, stdout: str, stderr: str, fragment: str) -> None:
    assert code == UserError.exit_code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    _bad_inputs_in(path)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_no_output(case, workdir, digits_baseline):
    args, fragment = BAD_INPUTS[case]
    args = [a.replace("{baseline}", str(digits_baseline)) for a in args]
    before = sorted(p.name for p in workdir.iterdir())
    result = hpqdeploy(*args, cwd=workdir)
    _check_one_line(result.returncode, result.stdout, result.stderr, fragment)
    assert sorted(p.name for p in workdir.iterdir()) == before  # no out/ and no out.partial/


@pytest.mark.parametrize("case", list(MORE_BAD_INPUTS))
def test_bad_input_through_main(case, workdir, digits_baseline, monkeypatch, capsys):
    args, fragment = MORE_BAD_INPUTS[case]
    args = [a.replace("{baseline}", str(digits_baseline)) for a in args]
    before = sorted(p.name for p in workdir.iterdir())
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["hpqdeploy", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    _check_one_line(exit_info.value.code, captured.out, captured.err, fragment)
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_existing_output_is_not_touched(workdir, digits_baseline, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = hpqdeploy("compress", str(digits_baseline), "-o", str(out), "--epochs", "0", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: output directory") and "remove it first" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_usage_error_is_one_line(workdir):
    result = hpqdeploy("compress", cwd=workdir)  # the BASELINE argument is missing
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "BASELINE" in result.stderr or "baseline" in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--help" in line


@pytest.mark.parametrize("name", ["w[minilm].th", "w[/x].th"])
def test_error_message_is_printed_verbatim(name, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["hpqdeploy", *_train("--weights", name)])
    with pytest.raises(SystemExit):
        main()
    assert f"weights file not found: {name}" in capsys.readouterr().err


# ---------------------------------------------------------------- CliRunner: commands are thin over the library


def test_cli_train_and_compress_json(tmp_path):
    base, out = tmp_path / "base", tmp_path / "quant"
    result = runner.invoke(app, [*TRAIN[:-1], str(base), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["method"] == "baseline" and metrics["eval_examples"] == 32
    assert metrics == artifact.load(base).metrics
    assert artifact.load(base).provenance["command"].startswith("hpqdeploy ")

    with pytest.warns(UserWarning, match="below the budget"):  # onnxruntime cannot reach 25% at 4 bits
        result = runner.invoke(app, ["compress", str(base), "-o", str(out), "--method", "quant", "--epochs", "0",
                                     "--low-bit-share", "0.25", "--target", "onnxruntime", "--importance",
                                     "magnitude", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    a = artifact.load(out)
    assert metrics["method"] == "quant" and metrics == a.metrics
    assert a.plan["target"] == "onnxruntime"
    assert a.provenance["config"]["importance"] == "magnitude" and a.provenance["config"]["low_bit_share"] == 0.25
    # onnxruntime runs no 4-bit conv: only the classifier (64 inputs = 2 groups of 32) can take 4 bits.
    assert all(run["bits"] == 8 for name, q in a.plan["quantization"].items() if name != "linear" for run in q["bits"])
    assert a.plan["quantization"]["linear"]["group_size"] == 32
    assert 0 < metrics["low_bit_share"] < 0.01


def test_cli_bits_option_repeats(tmp_path, digits_baseline):
    out = tmp_path / "q"
    result = runner.invoke(app, ["compress", str(digits_baseline), "-o", str(out), "--method", "quant", "--bits",
                                 "8", "--bits", "4", "--low-bit-share", "0.3", "--act-bits", "0", "--epochs", "0",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    quant = artifact.load(out).plan["quantization"]
    assert {run["bits"] for q in quant.values() for run in q["bits"]} == {8, 4}
    assert all(q["act_bits"] is None and q["act_range"] is None for q in quant.values())  # --act-bits 0: float


@pytest.mark.parametrize("args", [
    ["compress", "{baseline}", "-o", "{out}", "--method", "nosuch"],
    ["compress", "{baseline}", "-o", "{out}", "--prune-ratio", "0"],
    ["train", "resnet21", "--data", "digits", "-o", "{out}"],
])
def test_cli_runner_raises_user_error(args, tmp_path, digits_baseline):
    """Under CliRunner, `app` lets the UserError through (main() is what prints it); nothing is written."""
    args = [a.replace("{baseline}", str(digits_baseline)).replace("{out}", str(tmp_path / "out")) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError)
    assert not (tmp_path / "out").exists() and not atomic.partial_dir(tmp_path / "out").exists()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "compress", "demo"):
        assert command in result.stdout


def test_cli_reconstruct_refits_and_records(tmp_path, digits_baseline):
    out = tmp_path / "r"
    result = runner.invoke(app, ["compress", str(digits_baseline), "-o", str(out), "--method", "prune",
                                 "--reconstruct", "--epochs", "0", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["reconstruction"] and metrics == artifact.load(out).metrics
    assert all(r["error_after"] < r["error_before"] for r in metrics["reconstruction"].values())
    assert artifact.load(out).provenance["config"]["reconstruct"] is True


def test_the_export_table_says_which_runtime_the_accuracy_comes_from():
    """TensorRT without a GPU: the Q/DQ graph is evaluated in ONNX Runtime, and the table says so."""
    from rich.console import Console

    from hpqdeploy.cli.tables import export_table

    report = {"method": "hybrid", "runtime": "tensorrt", "session": {"runtime": "onnxruntime"}, "accuracy": 0.9,
              "accuracy_pytorch": 0.91, "top1_agreement": 0.99, "max_abs_diff": 0.1, "bytes_on_disk": 10,
              "legalization": []}
    console = Console(width=200, record=True)
    console.print(export_table(report))
    text = console.export_text()
    assert "evaluated in onnxruntime" in text and "accuracy (onnxruntime)" in text
    console = Console(width=200, record=True)
    console.print(export_table({**report, "runtime": "onnxruntime"}))
    assert "evaluated in" not in console.export_text()


def test_an_out_of_range_low_bit_share_is_refused_before_the_analysis(digits_baseline, tmp_path):
    """The configuration refuses it on construction, so no command can start the minutes-long analysis with it;
    on the command line it is named as written there."""
    from hpqdeploy.config import CompressOptions

    with pytest.raises(UserError, match=re.escape("low_bit_share must be in [0, 1], got 2")):
        CompressOptions(method="hybrid", low_bit_share=2.0)
    result = hpqdeploy("compress", str(digits_baseline), "-o", str(tmp_path / "out"), "--low-bit-share", "2",
                       cwd=tmp_path)
    _check_one_line(result.returncode, result.stdout, result.stderr, "--low-bit-share must be in [0, 1], got 2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- the flags every command takes

COMMANDS = sorted(typer.main.get_command(app).commands)  # from the app itself: a new command is covered too
BAD_INPUT_OF = {"demo": ["--epochs", "0"]}  # every other command: an input directory (or file) that does not exist


def test_the_commands_are_found():
    assert {"train", "compress", "export", "profile", "report", "experiment", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_json_quiet_and_verbose(command):
    click_command = typer.main.get_command(app).commands[command]
    options = {opt for param in click_command.params for opt in getattr(param, "opts", [])}
    assert {"--json", "--quiet", "--verbose"} <= options
    result = runner.invoke(app, [command, "--json", "--quiet", "--verbose", "--help"])  # an unknown flag: exit 2
    assert result.exit_code == 0, result.output
    for flag in ("--json", "--quiet", "--verbose"):
        assert flag in result.stdout


@pytest.mark.parametrize("flags", [["--json"], ["--quiet"], ["--verbose"], ["--json", "--quiet", "--verbose"]])
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_is_one_line_whatever_the_flags(command, flags, tmp_path, monkeypatch, capsys):
    """With --json nothing reaches stdout but the document, so a failure leaves it empty; the error is one line."""
    args = BAD_INPUT_OF.get(command, [str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hpqdeploy", command, *args, *flags])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_quiet_prints_no_table_and_json_only_the_document(digits_baseline, tmp_path):
    for flags, expect in ((["--quiet"], ""), (["--json", "--quiet"], "json"), ([], "table")):
        out = tmp_path / f"prune{len(flags)}"
        result = runner.invoke(app, ["compress", str(digits_baseline), "-o", str(out), "--method", "prune",
                                     "--epochs", "0", *flags])
        assert result.exit_code == 0, result.output
        if expect == "json":
            assert json.loads(result.stdout)["method"] == "prune"
        elif expect == "table":
            assert "prune → " in result.stdout and "Δacc (pt)" in result.stdout
        else:
            assert result.stdout == ""


def test_the_table_per_runtime_has_a_row_per_runtime_and_method():
    """What the demo ends with: from the report's rows, accuracy in the runtime, bytes on disk, latency at batch 1;
    a value no result file holds is "-"."""
    from rich.console import Console

    from hpqdeploy.cli.tables import runtime_tables

    def row(runtime, method, acc, size, p50):
        profiles = [] if p50 is None else [{"device": "x86", "batch": 1, "threads": 1, "p50_ms": p50}]
        return {"runtime": runtime, "method": method, "run": method, "variant": "", "accuracy_runtime": acc,
                "accuracy_pytorch": 0.9, "bytes_on_disk": size, "compression_vs_fp32": 4.0, "profiles": profiles}

    model = {"label": "resnet20 on digits", "runtimes": {
        "onnxruntime": [row("onnxruntime", "baseline", 0.91, 1_000_000, 0.25), row("onnxruntime", "hybrid", 0.9,
                                                                                    250_000, 0.125)],
        "executorch": [row("executorch", "hybrid", 0.89, 300_000, None)]}}
    console = Console(width=200, record=True)
    for table in runtime_tables([model, {"label": "nothing exported", "runtimes": {}}]):
        console.print(table)
    text = console.export_text()
    assert "resnet20 on digits, per runtime" in text and "nothing exported" not in text
    assert "p50 ms x86 b1" in text and "acc (runtime)" in text and "bytes on disk" in text
    lines = [line for line in text.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == ["onnxruntime", "onnxruntime", "executorch"]
    assert "91.00%" in lines[0] and "0.25" in lines[0] and "1 MB" in lines[0]
    assert lines[2].rstrip("│ ").endswith("-")  # not profiled
