"""`run_experiment`: one TOML runs baseline → methods → exports → profiles → report, resumably.

One real run (ResNet-8 on digits, one epoch, ONNX Runtime, tiny profiles) is made per module; every other test works
on a copy of it, so what a test changes shows up as exactly the steps that re-run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from hpqdeploy import pipeline  # noqa: E402
from hpqdeploy.errors import UserError  # noqa: E402
from hpqdeploy.experiment import config as experiment_config  # noqa: E402
from hpqdeploy.experiment import load_config, run_experiment  # noqa: E402
from conftest import ROOT

CONFIG = """\
[experiment]
name = "tiny"
out = "out"

[baseline]
model = "resnet8"
data = "digits"
epochs = 1
batch_size = 32
train_limit = 128
eval_limit = 64
calib_size = 64

[compress]
methods = ["hybrid", "prune", "quant"]
epochs = 1
batch_size = 32
train_limit = 128
calib_batches = 1

[export]
targets = ["onnxruntime"]
batch_size = 16
eval_limit = 32
calib_batches = 1

[profile]
device = "x86"
batch_sizes = [1, 2]
iters = 3
repeats = 1
warmup = 1
warmup_seconds = 0.0
idle_seconds = 0.0
"""
METHODS = ("hybrid", "prune", "quant")
SOURCES = ("baseline", *METHODS)
STEPS = ["baseline", *(f"compress/{m}" for m in METHODS), *(f"export/{s}-onnxruntime" for s in SOURCES),
         *(f"profile/{s}-onnxruntime-b{b}" for s in SOURCES for b in (1, 2)), "report"]


def downstream_of(method: str) -> set[str]:
    return {f"compress/{method}", f"export/{method}-onnxruntime", f"profile/{method}-onnxruntime-b1",
            f"profile/{method}-onnxruntime-b2", "report"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """The experiment run once, for real (the report stage included)."""
    root = tmp_path_factory.mktemp("experiment")
    (root / "exp.toml").write_text(CONFIG)
    return root, run_experiment(root / "exp.toml", quiet=True, command="pytest")


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A private copy of the finished experiment (mtimes kept); returns its TOML."""
    shutil.copytree(finished[0], tmp_path / "e")
    return tmp_path / "e" / "exp.toml"


@pytest.fixture
def fake_report(monkeypatch) -> list:
    """The report stage replaced by a quick stand-in that records the directories it was given."""
    from hpqdeploy import reporting

    calls = []

    def run_report(dirs, out, html=False):
        calls.append([Path(d) for d in dirs])
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps({"inputs": [str(d) for d in dirs]}))
        return {}

    monkeypatch.setattr(reporting, "run_report", run_report)
    return calls


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.parent != out}


def ran(summary: dict) -> set[str]:
    return {name for name, r in summary["steps"].items() if r["status"] == "ran"}


def state(toml: Path) -> dict:
    return json.loads((toml.parent / "out" / "experiment.json").read_text())["steps"]


def test_full_run_produces_every_step(finished):
    root, summary = finished
    out = root / "out"
    assert list(summary["steps"]) == STEPS
    assert all(r["status"] == "ran" for r in summary["steps"].values())
    assert summary["counts"] == {"ran": len(STEPS), "cached": 0, "skipped": 0}
    marker = {"baseline": "metrics.json", "compress": "metrics.json", "export": "export.json",
              "profile": "profile.json", "report": "report.json"}
    for name, r in summary["steps"].items():
        assert Path(r["output"]) == out / name
        assert (Path(r["output"]) / marker[name.split("/")[0]]).is_file(), name
        assert len(r["hash"]) == 64 and r["seconds"] >= 0
    assert not list(out.rglob("*.partial"))
    recorded = json.loads((out / "experiment.json").read_text())
    assert {n: s["status"] for n, s in recorded["steps"].items()} == dict.fromkeys(STEPS, "done")
    assert recorded["settings"]["compress"]["prune"]["prune_ratio"] == 0.3
    # every step was fed what the config says, and each export/profile came from its own upstream step
    prune = json.loads((out / "compress/prune/metrics.json").read_text())
    assert prune["method"] == "prune" and prune["eval_examples"] == 64
    exported = json.loads((out / "export/quant-onnxruntime/export.json").read_text())
    assert Path(exported["source"]) == out / "compress/quant" and exported["eval_examples"] == 32
    profiled = json.loads((out / "profile/hybrid-onnxruntime-b2/profile.json").read_text())
    assert Path(profiled["artifact"]) == out / "export/hybrid-onnxruntime"
    assert profiled["settings"]["batch"] == 2 and profiled["settings"]["iters"] == 3
    report = json.loads((out / "report/report.json").read_text())
    assert report["counts"] == {"compressed": 4, "exports": 4, "profiles": 8}


def test_rerun_skips_every_finished_step(copy):
    out = copy.parent / "out"
    before, hashes = mtimes(out), {n: r["hash"] for n, r in state(copy).items()}
    summary = run_experiment(copy, quiet=True)
    assert {n: r["status"] for n, r in summary["steps"].items()} == dict.fromkeys(STEPS, "cached")
    assert {n: r["hash"] for n, r in summary["steps"].items()} == hashes
    assert mtimes(out) == before


def test_changed_method_setting_reruns_that_method_and_downstream_only(copy, fake_report):
    out = copy.parent / "out"
    before = mtimes(out)
    kept_before = sum(g["kept"] for g in json.loads((out / "compress/prune/plan.json").read_text())["pruning"])
    copy.write_text(CONFIG.replace("[export]", "[compress.prune]\nprune_ratio = 0.5\n\n[export]"))
    hashes = {n: r["hash"] for n, r in state(copy).items()}
    summary = run_experiment(copy, quiet=True)
    assert ran(summary) == downstream_of("prune")
    changed = {n for n, r in summary["steps"].items() if r["hash"] != hashes[n]}
    assert changed == downstream_of("prune")  # the new setting reaches them through the hash chain
    assert all(r["status"] == "cached" for n, r in summary["steps"].items() if n not in downstream_of("prune"))
    assert json.loads((out / "compress/prune/provenance.json").read_text())["config"]["prune_ratio"] == 0.5
    kept = sum(g["kept"] for g in json.loads((out / "compress/prune/plan.json").read_text())["pruning"])
    assert kept < kept_before
    after = mtimes(out)
    for path, t in before.items():
        changed = after.get(path) != t
        assert changed == any(path.startswith(s.split("/", 1)[-1] if s == "report" else s + "/")
                              for s in downstream_of("prune")), path
    assert len(fake_report) == 1 and len(fake_report[0]) == len(STEPS) - 1


def test_regenerated_output_reruns_what_was_made_from_it(copy, fake_report):
    """Same settings, same hash, but a new output (it was deleted): what was made from the old one is redone."""
    out = copy.parent / "out"
    shutil.rmtree(out / "compress/quant")
    summary = run_experiment(copy, quiet=True)
    assert ran(summary) == downstream_of("quant")
    assert all(r["hash"] == state(copy)[n]["hash"] for n, r in summary["steps"].items())


def test_changed_shared_setting_reruns_every_method_but_not_the_baseline_side(copy, fake_report):
    copy.write_text(CONFIG.replace("calib_batches = 1\n\n[export]", "calib_batches = 2\n\n[export]"))
    summary = run_experiment(copy, quiet=True)
    baseline_side = {"baseline", "export/baseline-onnxruntime", "profile/baseline-onnxruntime-b1",
                     "profile/baseline-onnxruntime-b2"}
    assert ran(summary) == set(STEPS) - baseline_side


class _InterruptAt:
    """A training loader that raises KeyboardInterrupt when its `epoch`-th pass starts (a Ctrl-C mid-run)."""

    def __init__(self, data, epoch: int):
        self.data, self.epoch, self.passes = data, epoch, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        self.passes += 1
        if self.passes == self.epoch:
            raise KeyboardInterrupt
        return iter(self.data)


def test_interrupted_compress_resumes_from_its_checkpoint(copy, fake_report, monkeypatch):
    """With `fade`, pruning runs in two phases (the removed channels fade out over the first epoch, then the pruned
    model trains on); the interrupted run resumes in the second one, without repeating the first."""
    out = copy.parent / "out"
    copy.write_text(CONFIG.replace("methods = [\"hybrid\", \"prune\", \"quant\"]\nepochs = 1",
                                   "methods = [\"hybrid\", \"prune\", \"quant\"]\nepochs = 3\nfade = 0.3"))
    real_finetune = pipeline.finetune
    epochs_trained, interrupt_at = {}, {"prune": 3}

    def interrupting(model, data, cfg, checkpoint=None, *args, **kwargs):
        method = checkpoint.parent.name.removesuffix(".partial")
        done = epochs_trained.get(method, 0)  # passes over the data in this method's earlier phases
        loader = _InterruptAt(data, epoch=interrupt_at.get(method, 0) - done)
        try:
            return real_finetune(model, loader, cfg, checkpoint, *args, **kwargs)
        finally:
            epochs_trained[method] = done + loader.passes

    monkeypatch.setattr(pipeline, "finetune", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(copy, quiet=True)
    steps = state(copy)
    assert steps["baseline"]["status"] == "done" and steps["compress/hybrid"]["status"] == "done"
    assert steps["compress/prune"]["status"] == "interrupted"
    assert not (out / "compress/prune").exists()  # the stale 1-epoch output is gone, the new one unfinished
    assert (out / "compress/prune.partial/fade.ckpt").is_file()
    assert (out / "compress/prune.partial/compress.ckpt").is_file()
    hybrid_mtime = (out / "compress/hybrid/model.safetensors").stat().st_mtime_ns

    interrupt_at.clear()  # from here on the wrapper only counts the passes over the training data
    resumed = []
    real_compress = pipeline.run_compress

    def spy(baseline, out, opts, data, quiet, resume, command, compute=None):
        resumed.append(resume)
        return real_compress(baseline, out, opts, data, quiet, resume, command, compute)

    monkeypatch.setattr(pipeline, "run_compress", spy)
    epochs_trained.clear()
    summary = run_experiment(copy, quiet=True)
    assert summary["steps"]["baseline"]["status"] == "cached"
    assert summary["steps"]["compress/hybrid"]["status"] == "cached"
    assert {"compress/prune", "compress/quant", "report"} <= ran(summary)
    assert (out / "compress/hybrid/model.safetensors").stat().st_mtime_ns == hybrid_mtime
    assert resumed == [True, False]  # prune continued its run, quant started fresh
    assert epochs_trained == {"prune": 1, "quant": 3}  # prune trained only the epoch it had left
    metrics = json.loads((out / "compress/prune/metrics.json").read_text())
    assert metrics["fade_epochs"] == 1
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert state(copy)["compress/prune"]["resumed"] is True


def test_failed_step_stops_the_run_and_a_rerun_continues(copy, fake_report, monkeypatch):
    from hpqdeploy.lower import export

    out = copy.parent / "out"
    copy.write_text(CONFIG.replace("eval_limit = 32", "eval_limit = 48"))
    real_export = export.run_export
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("lowering crashed\nsecond line")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export, "run_export", failing)
    with pytest.raises(UserError) as err:
        run_experiment(copy, quiet=True)
    message = str(err.value)
    assert "\n" not in message and "export/hybrid-onnxruntime" in message
    assert "RuntimeError: lowering crashed" in message
    steps = state(copy)
    assert steps["export/baseline-onnxruntime"]["status"] == "done"
    assert steps["export/hybrid-onnxruntime"]["status"] == "failed"
    assert "export/prune-onnxruntime" in steps and steps["export/prune-onnxruntime"]["status"] == "done"  # old run
    first = mtimes(out / "export/baseline-onnxruntime")

    monkeypatch.setattr(export, "run_export", real_export)
    summary = run_experiment(copy, quiet=True)
    assert summary["steps"]["export/baseline-onnxruntime"]["status"] == "cached"
    assert mtimes(out / "export/baseline-onnxruntime") == first
    assert ran(summary) == {f"export/{s}-onnxruntime" for s in METHODS} | {
        f"profile/{s}-onnxruntime-b{b}" for s in SOURCES for b in (1, 2)} | {"report"}
    assert json.loads((out / "export/hybrid-onnxruntime/export.json").read_text())["eval_examples"] == 48


def test_missing_extra_export_is_skipped_and_the_run_goes_on(copy, fake_report, monkeypatch):
    from hpqdeploy.lower.base import get_runtime

    monkeypatch.setattr(type(get_runtime("openvino")), "missing", lambda self: "openvino")
    copy.write_text(CONFIG.replace('targets = ["onnxruntime"]', 'targets = ["onnxruntime", "openvino"]'))
    summary = run_experiment(copy, quiet=True)
    steps = summary["steps"]
    for source in SOURCES:
        assert steps[f"export/{source}-onnxruntime"]["status"] == "cached"
        skipped = steps[f"export/{source}-openvino"]
        assert skipped["status"] == "skipped" and "pip install 'hpqdeploy[openvino]'" in skipped["reason"]
        assert not Path(skipped["output"]).exists()
        for b in (1, 2):
            assert steps[f"profile/{source}-openvino-b{b}"]["status"] == "skipped"
            profile = steps[f"profile/{source}-openvino-b{b}"]
            assert profile["reason"] == f"needs export/{source}-openvino, which was skipped"
    assert ran(summary) == {"report"}
    assert state(copy)["export/quant-openvino"]["status"] == "skipped"
    assert all("openvino" not in str(d) for d in fake_report[0])
    again = run_experiment(copy, quiet=True)  # still missing: skipped again, nothing else redone
    assert ran(again) == set() and again["counts"]["skipped"] == 12


def test_profile_without_a_runner_on_the_device_is_skipped(copy, fake_report):
    copy.write_text(CONFIG.replace('device = "x86"', 'device = "android"'))
    summary = run_experiment(copy, quiet=True)
    profiles = {n: r for n, r in summary["steps"].items() if n.startswith("profile/")}
    assert len(profiles) == 8 and all(r["status"] == "skipped" for r in profiles.values())
    assert "no runner for onnxruntime" in profiles["profile/hybrid-onnxruntime-b1"]["reason"]
    assert ran(summary) == {"report"}


def test_existing_baseline_dir_is_used_not_rewritten(finished, tmp_path, fake_report):
    base = tmp_path / "mine" / "baseline"
    shutil.copytree(finished[0] / "out" / "baseline", base)
    (tmp_path / "exp.toml").write_text('[baseline]\ndir = "mine/baseline"\n[export]\ntargets = ["onnxruntime"]\n'
                                       'batch_size = 16\neval_limit = 32\ncalib_batches = 1\n')
    before = mtimes(base.parent)
    first = run_experiment(tmp_path / "exp.toml", quiet=True)
    assert first["steps"]["baseline"]["status"] == "cached"
    assert first["steps"]["baseline"]["output"] == str(base.resolve())
    assert ran(first) == {"export/baseline-onnxruntime", "report"}
    assert (tmp_path / "runs" / "exp" / "export" / "baseline-onnxruntime" / "export.json").is_file()
    assert mtimes(base.parent) == before
    (base / "metrics.json").write_text((base / "metrics.json").read_text() + "\n")  # the baseline changed
    second = run_experiment(tmp_path / "exp.toml", quiet=True)
    assert ran(second) == {"export/baseline-onnxruntime", "report"}
    assert second["steps"]["baseline"]["hash"] != first["steps"]["baseline"]["hash"]


def test_output_not_written_by_the_experiment_is_never_removed(tmp_path):
    (tmp_path / "exp.toml").write_text(CONFIG)
    foreign = tmp_path / "out" / "baseline"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write it"):
        run_experiment(tmp_path / "exp.toml", quiet=True)
    assert (foreign / "keep.txt").read_text() == "mine"


BAD = [  # (replacements in CONFIG, what the one-line error must say)
    ([("calib_batches = 1\n\n[export]", "calib_batches = 1\nepoch = 2\n\n[export]")],
     "unknown key compress.epoch; did you mean compress.epochs?"),
    ([('data = "digits"\nepochs = 1', 'data = "digits"\nepochs = "two"')],
     "baseline.epochs must be an integer, got 'two' (string)"),
    ([("iters = 3", "iters = true")], "profile.iters must be an integer, got True (boolean)"),
    ([('methods = ["hybrid", "prune", "quant"]', 'methods = ["hybrid", "distil"]')],
     "compress.methods: unknown method 'distil'"),
    ([('targets = ["onnxruntime"]', 'targets = ["tflite"]')], "export.targets: unknown target 'tflite'"),
    ([('device = "x86"', 'device = "raspberry-pi"')], "profile.device must be one of android, jetson-agx-orin"),
    ([("[experiment]", "[experimnt]")], "unknown section [experimnt]; did you mean [experiment]?"),
    ([('data = "digits"\n', "")], "baseline.data is missing"),
    ([('model = "resnet8"', 'model = "resnet9000"')], "baseline.model: unknown model 'resnet9000'"),
    ([('model = "resnet8"', 'model = "resnet8"\nweights = "nope.th"')], "baseline.weights: file"),
    ([("[export]", "[compress.quant]\nbits = [8, 4, 12]\n\n[export]")], "compress.quant.bits must be in [2, 8], got [8, 4, 12]"),
    ([("[export]", "[compress.prune]\nprune_ratio = 1.5\n\n[export]")],
     "compress.prune.prune_ratio must be in (0, 1), got 1.5"),
    ([("[export]", "[compress.prune]\nepochs = -1\n\n[export]")], "compress.prune.epochs must be >= 0"),
    ([("batch_sizes = [1, 2]", "batch_sizes = [1, 0]")], "profile.batch_sizes must be >= 1"),
    ([("batch_sizes = [1, 2]", 'batch_sizes = [1, 2]\ntargets = ["openvino"]')],
     "profile.targets: 'openvino' is not in export.targets"),
    ([('methods = ["hybrid", "prune", "quant"]', 'methods = ["hybrid", "prune"]'),
      ("[export]", "[compress.quant]\nact_bits = 8\n\n[export]")],
     "[compress.quant] is set but 'quant' is not in compress.methods"),
    ([("[export]\n", '[export]\nmixed = "both"\n')], "export.mixed must be one of split, layer, got 'both'"),
    ([("[export]\ntargets", "[export]\ntargets = []\ntarget")], "export.targets must not be empty"),
    ([("[baseline]\n", '[baseline]\ndir = "elsewhere"\n')], "cannot be combined with baseline.dir"),
    ([("[export]", "[report]\nhtml = 1\n\n[export]")], "report.html must be true or false, got 1"),
    ([('name = "tiny"', 'name = "tiny"\nname = "again"')], "not valid TOML"),
    ([("calib_size = 64", "calib_size = 64\nwarmup = 1")], "baseline.warmup must be below baseline.epochs, got 1"),
    ([("[export]", "[compress.hybrid]\nwarmup = 2\n\n[export]")],
     "compress.hybrid.warmup must be below compress.hybrid.epochs, got 2"),
    ([("calib_batches = 1\n\n[export]", "calib_batches = 1\nwarmup = -0.5\n\n[export]")],
     "compress.warmup must be >= 0"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[b[1][:48] for b in BAD])
def test_config_errors_are_one_line_naming_the_key(tmp_path, changes, message):
    text = CONFIG
    for old, new in changes:
        assert old in text
        text = text.replace(old, new, 1)
    (tmp_path / "exp.toml").write_text(text)
    with pytest.raises(UserError) as err:
        run_experiment(tmp_path / "exp.toml", quiet=True)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "exp.toml") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_profile_without_export_is_an_error(tmp_path):
    start, end = CONFIG.index("[export]"), CONFIG.index("[profile]")
    (tmp_path / "exp.toml").write_text(CONFIG[:start] + CONFIG[end:])
    with pytest.raises(UserError, match=r"\[profile\] needs an \[export\] section"):
        load_config(tmp_path / "exp.toml")


def test_good_config_loads_with_defaults_filled_in(tmp_path):
    (tmp_path / "exp.toml").write_text(CONFIG + "\n[compress.quant]\nlow_bit_share = 0.75\n")
    cfg = load_config(tmp_path / "exp.toml")
    assert cfg.out == tmp_path / "out" and cfg.data == "digits"
    assert cfg.compress["quant"]["low_bit_share"] == 0.75 and cfg.compress["hybrid"]["low_bit_share"] == 0.5
    assert cfg.compress["prune"]["distill"] == 0.9 and cfg.export["mixed"] == "split"
    assert cfg.profile["targets"] is None and cfg.report == {"html": False}


def test_training_settings_reach_the_stages(tmp_path):
    """warmup, optimizer and mixup given in the TOML are what train and compress run with, per method where
    overridden."""
    (tmp_path / "exp.toml").write_text(CONFIG.replace("epochs = 1", "epochs = 2").replace(
        "calib_size = 64", 'calib_size = 64\nwarmup = 0.5\noptimizer = "sgd"\nmixup = 0.4').replace(
        "[export]", "[compress.prune]\nwarmup = 1.5\nmixup = 1.0\ndistill = 0.5\n\n[export]"))
    cfg = load_config(tmp_path / "exp.toml")
    base = experiment_config.train_config(cfg.baseline, cfg.seed)
    assert (base.warmup, base.optimizer, base.epochs, base.mixup) == (0.5, "sgd", 2, 0.4)
    prune = experiment_config.compress_options("prune", cfg.compress["prune"], cfg.seed).train
    hybrid = experiment_config.compress_options("hybrid", cfg.compress["hybrid"], cfg.seed).train
    assert (prune.warmup, prune.optimizer, hybrid.warmup, hybrid.optimizer) == (1.5, "adam", 0.0, "adam")
    assert (prune.mixup, prune.distill, hybrid.mixup, hybrid.distill) == (1.0, 0.5, 0.0, 0.9)
    assert (prune.temperature, prune.epochs, prune.seed) == (4.0, 2, cfg.seed)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").glob("*.toml")))
def test_shipped_configs_are_valid(name, monkeypatch):
    """Every file in experiments/ passes validation (data and weights this machine lacks are faked in place)."""
    path = ROOT / "experiments" / name
    real_resolve = experiment_config._resolve
    monkeypatch.setattr(experiment_config, "_resolve", lambda root, value: _existing(real_resolve(root, value)))
    cfg = load_config(path)
    assert cfg.compress and set(cfg.export["targets"]) <= {"onnxruntime", "openvino", "executorch", "tensorrt"}
    assert cfg.profile is not None


def _existing(path: Path) -> Path:
    """The path if it exists, else a stand-in that does (a file for weights, a directory for data)."""
    if path.exists():
        return path
    return Path(__file__) if path.suffix in (".th", ".pth", ".pt") else Path(__file__).parent


def test_experiment_under_torchrun_is_refused_in_one_line(tmp_path, monkeypatch):
    """Its export and profile steps run in one process; data-parallel fine-tuning is `train`/`compress` under
    torchrun."""
    (tmp_path / "exp.toml").write_text(CONFIG)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="^experiment runs its steps in one process"):
        run_experiment(tmp_path / "exp.toml", quiet=True)
    assert not (tmp_path / "out").exists()
