"""Property-based: whatever options and files a user passes, a command either succeeds and writes its output, or
ends with one `error:` line, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpqdeploy.cli.app import main

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
small_ints = st.integers(min_value=-2, max_value=48)
odd_floats = st.sampled_from(["0", "-1", "1e-3", "0.5", "1", "1.5", "nan", "inf", "abc", ""])


def _option(flag: str, values) -> st.SearchStrategy:
    """The flag with a value, or left out."""
    return st.one_of(st.just([]), values.map(lambda v: [flag, str(v)]))


def _invoke(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["hpqdeploy", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _check(code: int, text: str, out: Path) -> None:
    assert "Traceback" not in text, text[-3000:]
    partial = out.with_name(out.name + ".partial")
    if code == 0:
        assert out.is_dir() and not partial.exists(), text[-2000:]
    else:
        assert code == 2, text[-2000:]
        lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, text[-2000:]
        assert not out.exists() and not partial.exists(), text[-2000:]


@SETTINGS
@given(epochs=_option("--epochs", st.integers(-1, 1)), train_limit=_option("--train-limit", small_ints),
       eval_limit=_option("--eval-limit", small_ints), calib=_option("--calib-size", small_ints),
       batch=_option("--batch-size", small_ints), lr=_option("--lr", odd_floats),
       warmup=_option("--warmup", odd_floats), mixup=_option("--mixup", odd_floats))
def test_train_options(monkeypatch, capsys, epochs, train_limit, eval_limit, calib, batch, lr, warmup, mixup):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = ["train", "resnet8", "--data", "digits", "--quiet", "-o", str(out), *(epochs or ["--epochs", "0"]),
                *(train_limit or ["--train-limit", "32"]), *(eval_limit or ["--eval-limit", "16"]), *calib, *batch,
                *lr, *warmup, *mixup]
        code, text = _invoke(args, monkeypatch, capsys)
        _check(code, text, out)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    from hpqdeploy.config import TrainConfig
    from hpqdeploy.config import DataOptions
    from hpqdeploy.pipeline import run_train

    out = tmp_path_factory.mktemp("prop") / "baseline"
    run_train("resnet8", DataOptions("digits", calib_size=32, train_limit=64, eval_limit=32), out,
              TrainConfig(epochs=0, batch_size=32), quiet=True)
    return out


def _damaged(baseline: Path, damage: str, where: Path) -> Path:
    """A copy of the baseline with one kind of damage a user's files meet."""
    copy = where / "baseline"
    shutil.copytree(baseline, copy)
    if damage == "truncated weights":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "no plan":
        (copy / "plan.json").unlink()
    elif damage == "plan not json":
        (copy / "plan.json").write_text("{")
    elif damage == "plan of another model":
        plan = json.loads((copy / "plan.json").read_text())
        plan["model"]["name"] = "resnet20"
        (copy / "plan.json").write_text(json.dumps(plan))
    elif damage == "a file, not a directory":
        shutil.rmtree(copy)
        copy.write_text("not an artifact")
    return copy


@SETTINGS
@given(damage=st.sampled_from(["none", "truncated weights", "no plan", "plan not json", "plan of another model",
                               "a file, not a directory"]),
       method=_option("--method", st.sampled_from(["hybrid", "prune", "quant", "nosuch"])),
       ratio=_option("--prune-ratio", odd_floats), share=_option("--low-bit-share", odd_floats),
       bits=st.lists(st.integers(1, 9), max_size=3), target=_option("--target", st.sampled_from(
           ["onnxruntime", "openvino", "executorch", "tensorrt", "nosuch"])))
def test_compress_options_and_files(baseline, monkeypatch, capsys, damage, method, ratio, share, bits, target):
    with tempfile.TemporaryDirectory() as tmp:
        source = _damaged(baseline, damage, Path(tmp))
        out = Path(tmp) / "out"
        args = ["compress", str(source), "--quiet", "--epochs", "0", "-o", str(out), *method, *ratio, *share,
                *[a for b in bits for a in ("--bits", str(b))], *target]
        code, text = _invoke(args, monkeypatch, capsys)
        _check(code, text, out)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=st.sampled_from(["none", "truncated weights", "no plan", "plan of another model"]),
       target=st.sampled_from(["onnxruntime", "openvino", "tensorrt", "nosuch", ""]),
       mixed=_option("--mixed", st.sampled_from(["split", "layer", "nosuch"])),
       batch=_option("--batch-size", small_ints), eval_limit=_option("--eval-limit", small_ints),
       overflow=_option("--overflow-fix", st.sampled_from(["auto", "on", "off", "maybe"])),
       threads=_option("--threads", st.integers(-1, 2)))
def test_export_options_and_files(baseline, monkeypatch, capsys, damage, target, mixed, batch, eval_limit, overflow,
                                  threads):
    with tempfile.TemporaryDirectory() as tmp:
        source = _damaged(baseline, damage, Path(tmp))
        out = Path(tmp) / "out"
        args = ["export", str(source), "--quiet", "--target", target, "-o", str(out), *mixed, *batch,
                *(eval_limit or ["--eval-limit", "16"]), *overflow, *threads]
        code, text = _invoke(args, monkeypatch, capsys)
        _check(code, text, out)


@pytest.fixture(scope="module")
def exported(baseline, tmp_path_factory) -> Path:
    from hpqdeploy.config import ExportOptions
    from hpqdeploy.lower.export import run_export

    out = tmp_path_factory.mktemp("prop-export") / "ort"
    run_export(baseline, out, ExportOptions("onnxruntime", eval_limit=16), quiet=True)
    return out


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(device=_option("--device", st.sampled_from(["x86", "jetson-orin-nano", "android", "nosuch"])),
       runner=_option("--runner", st.sampled_from(["onnxruntime", "trtexec", "nosuch"])),
       batch=_option("--batch-size", st.integers(-1, 4)), threads=_option("--threads", st.integers(-1, 2)),
       warmup=_option("--warmup", st.integers(-1, 2)), iters=_option("--iters", st.integers(-1, 3)),
       repeats=_option("--repeats", st.integers(-1, 2)), seconds=_option("--min-seconds", odd_floats),
       idle=_option("--idle-seconds", st.sampled_from(["0", "-1", "0.01", "nan"])),
       damage=st.sampled_from(["none", "no export.json", "no model"]))
@example(device=[], runner=[], batch=[], threads=[], warmup=[], iters=[], repeats=[],
         seconds=["--min-seconds", "inf"], idle=[], damage="none")  # once ran forever
def test_profile_options_and_files(exported, monkeypatch, capsys, device, runner, batch, threads, warmup, iters,
                                   repeats, seconds, idle, damage):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "artifact"
        shutil.copytree(exported, source)
        if damage == "no export.json":
            (source / "export.json").unlink()
        elif damage == "no model":
            (source / "model.onnx").unlink()
        out = Path(tmp) / "out"
        args = ["profile", str(source), "--json", "-o", str(out), *device, *runner, *batch,
                *threads, *(warmup or ["--warmup", "1"]), *(iters or ["--iters", "2"]),
                *(repeats or ["--repeats", "1"]), *seconds, *(idle or ["--idle-seconds", "0"])]
        code, text = _invoke(args, monkeypatch, capsys)
        _check(code, text, out)


EXPERIMENT = {
    "experiment": {"name": '"tiny"', "out": '"out"'},
    "baseline": {"model": '"resnet8"', "data": '"digits"', "epochs": "0", "batch_size": "16", "train_limit": "32",
                 "eval_limit": "16", "calib_size": "16"},
    "compress": {"methods": '["quant"]', "epochs": "0", "batch_size": "16", "train_limit": "32",
                 "calib_batches": "1"},
}
ODD_VALUES = ["0", "-1", "1.5", '"x"', "[]", "true", '["hybrid", "nosuch"]', "1e9", '""']
KEYS = [(s, k) for s, keys in EXPERIMENT.items() for k in keys] + [("compress", "prune_ratio"),
                                                                   ("compress", "low_bit_share"),
                                                                   ("baseline", "lr"), ("compress", "bits")]


def _toml(blocks: dict) -> str:
    return "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in kv.items()) for s, kv in blocks.items()) + "\n"


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from([None, *ODD_VALUES])), max_size=2),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_experiment_files(monkeypatch, capsys, changes, cut):
    """An experiment TOML with keys set to odd values, removed (None) or the file cut short."""
    blocks = {s: dict(kv) for s, kv in EXPERIMENT.items()}
    for (section, key), value in changes:
        if value is None:
            blocks[section].pop(key, None)
        else:
            blocks[section][key] = value
    text = _toml(blocks)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "exp.toml"
        config.write_text(text[:cut] if cut is not None else text)
        code, out_text = _invoke(["experiment", str(config), "--quiet"], monkeypatch, capsys)
        assert "Traceback" not in out_text, out_text[-3000:]
        if code:
            assert code == 2, out_text[-2000:]
            assert sum(line.startswith("error:") for line in out_text.splitlines()) == 1, out_text[-2000:]
            assert not (Path(tmp) / "out").exists(), out_text[-2000:]
