"""The Python API on models in memory: plan, apply, fine-tune in any loop, save, export, profile.

    import hpqdeploy as hq

    loaded = hq.load_model("resnet20", num_classes=10)
    calibration = [(images, labels), ...]                       # a few batches of the training data
    plan = hq.plan(loaded.module, loaded.example_inputs, calibration, hq.CompressOptions(prune_ratio=0.3))
    model = hq.apply(loaded.module, plan, calibration)         # pruned, fake-quantized, trainable
    ...  # fine-tune `model` in your own loop (or hq.finetune), with the uncompressed model as teacher if you like
    hq.save(model, plan, "runs/hybrid", source=loaded, data="cifar10")
    hq.export("runs/hybrid", "runs/hybrid-ort", hq.ExportOptions(target="onnxruntime"))

The directory `save` writes is the one `hpqdeploy compress` writes and `hpqdeploy export` reads; the commands are
built of these same calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import torch.nn as nn

from hpqdeploy import artifact, atomic, formats
from hpqdeploy.artifact import Artifact
from hpqdeploy.config import CompressOptions, DataOptions, ExportOptions, ProfileOptions, TrainConfig
from hpqdeploy.core.planning import apply, plan
from hpqdeploy.errors import UserError
from hpqdeploy.metrics import count_macs, count_params, param_breakdown, weight_bytes
from hpqdeploy.models import load_model
from hpqdeploy.models.spec import LoadedModel, ModelSpec
from hpqdeploy.training.loop import evaluate as _evaluate
from hpqdeploy.training.loop import finetune as _finetune

__all__ = ["CompressOptions", "DataOptions", "ExportOptions", "ProfileOptions", "TrainConfig", "Artifact",
           "LoadedModel", "ModelSpec", "apply", "evaluate", "export", "finetune", "load", "load_data", "load_model",
           "plan", "profile", "save"]


def load_data(options: DataOptions | str, seed: int = 0):
    """The data set's train, calibration and evaluation splits (`Splits`: torch Datasets and their `info`)."""
    from hpqdeploy.data import load_data as load

    opts = DataOptions(name=options) if isinstance(options, str) else options
    return load(opts.name, opts.request(seed))


def finetune(model: nn.Module, batches: Iterable, config: TrainConfig | None = None, *,
             teacher: nn.Module | None = None, checkpoint: str | Path | None = None, resume: bool = False,
             quiet: bool = True) -> list[dict]:
    """hpqdeploy's own loop (Adam or SGD, cosine schedule, distillation from `teacher` when `config.distill` > 0,
    a checkpoint per epoch); returns the per-epoch history. `batches`: (inputs, labels) pairs, e.g. a DataLoader."""
    cfg = config or TrainConfig()
    if cfg.batch_size is None:  # the loop takes the batches as given; the size is only recorded
        cfg = cfg.with_batch("image")
    return _finetune(model, batches, cfg, Path(checkpoint) if checkpoint else None, resume=resume, quiet=quiet,
                     teacher=teacher)


def evaluate(model: nn.Module, batches: Iterable, quiet: bool = True) -> dict:
    """Accuracy, mean loss and the number of examples over (inputs, labels) batches."""
    return _evaluate(model, batches, quiet=quiet)


def _source(source: LoadedModel | ModelSpec | str, num_classes: int | None, input_shape) -> LoadedModel:
    """What rebuilds the architecture when the directory is loaded: a loaded model (its spec and tokenizer), a
    spec, or a model name (registry, torchvision, module:function) with the number of classes."""
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, str):
        if num_classes is None:
            raise UserError(f"save: give num_classes with source={source!r} (how to rebuild the model)")
        source = load_model(source, num_classes=num_classes, input_shape=input_shape, pretrained=False).spec
    if not isinstance(source, ModelSpec):
        raise UserError("save: source must be a loaded model (hpqdeploy.load_model), a ModelSpec or a model name")
    from hpqdeploy.models import rebuild_model

    return rebuild_model(source)


def save(model: nn.Module, plan: dict | None, out: str | Path, *, source: LoadedModel | ModelSpec | str,
         data: DataOptions | str, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
         evaluation: Iterable | None = None, metrics: dict | None = None, baseline: Artifact | None = None) -> Path:
    """Write `model` (compressed per `plan`, or a baseline with `plan=None`) as the directory `export` reads.

    `source` says how to rebuild the unpruned architecture; `data` is the data set the exports are evaluated on.
    With `evaluation` batches the accuracy is measured and recorded; with `baseline` (a loaded `train` output) the
    ratios against it are recorded too. Written into `<out>.partial`, then renamed: never a half-written directory.
    """
    out = Path(out)
    atomic.check_output(out)
    built = _source(source, num_classes, input_shape)
    loaded = LoadedModel(model, built.spec, built.modality, built.collate, built.example_inputs, built.tokenizer)
    data_opts = DataOptions(name=data) if isinstance(data, str) else data
    record_data = {k: getattr(data_opts, k) for k in ("name", "data_dir", "calib_size", "train_limit", "eval_limit")}
    model.eval()
    if plan is None:
        record = {"model": built.spec.to_json(), "method": "baseline", "data": record_data, "pruning": [],
                  "quantization": {}, "target": None}
    else:
        record = artifact.plan_record(built.spec, record_data, plan, model)
    described = {"format_version": formats.VERSIONS["metrics.json"], "method": record["method"],
                 "accuracy": None, "params": count_params(model), "params_by_part": param_breakdown(model),
                 "macs": _macs(built, record["pruning"]), "bytes": weight_bytes(model)}
    if evaluation is not None:
        acc = _evaluate(model, evaluation, quiet=True)
        described.update(accuracy=acc["accuracy"], eval_loss=acc["loss"], eval_examples=acc["examples"])
    if plan is None:
        described.update(fp32_bytes=described["bytes"]["total"], compression=1.0)
    elif baseline is not None:
        b = baseline.metrics
        total = described["bytes"]["total"]
        described.update(fp32_bytes=b["fp32_bytes"], compression=round(b["fp32_bytes"] / total, 3),
                         params_ratio=round(described["params"] / b["params"], 4),
                         macs_ratio=round(described["macs"] / b["macs"], 4),
                         bytes_ratio=round(total / b["fp32_bytes"], 4))
        if described["accuracy"] is not None and b.get("accuracy") is not None:
            described["accuracy_drop"] = round(b["accuracy"] - described["accuracy"], 4)
    provenance = {"command": "hpqdeploy.save (Python API)", "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "config": {"plan_options": (plan or {}).get("options")}, **artifact.environment()}
    return artifact.save(out, loaded, record, {**described, **(metrics or {})}, provenance)


def _macs(built: LoadedModel, pruning: list[dict]) -> int:
    """MACs of the pruned architecture, counted on a float copy (the counter does not see fake-quantized layers)."""
    from hpqdeploy.core.planning import prune
    from hpqdeploy.core.prune import GroupDecision
    from hpqdeploy.models import rebuild_model

    fresh = rebuild_model(built.spec)
    model = prune(fresh.module, fresh.example_inputs, [GroupDecision.from_json(d) for d in pruning])
    return count_macs(model, fresh.example_inputs)


def load(path: str | Path) -> Artifact:
    """A directory written by `save`, `train` or `compress`: the rebuilt model (pruned and quantized as recorded,
    with its weights), its plan, metrics and provenance."""
    return artifact.load(Path(path))


def export(source: str | Path, out: str | Path, options: ExportOptions | str, quiet: bool = True) -> dict:
    """Lower a saved directory into a runtime's native artifact, evaluate it inside the runtime, and return (and
    write) export.json. `options`: an ExportOptions, or just the target's name."""
    from hpqdeploy.lower.export import run_export

    opts = ExportOptions(target=options) if isinstance(options, str) else options
    return run_export(Path(source), Path(out), opts, quiet, "hpqdeploy.export (Python API)")


def profile(export_dir: str | Path, out: str | Path, options: ProfileOptions | None = None) -> dict:
    """Latency percentiles, throughput, memory and energy of an exported artifact (profile.json)."""
    from hpqdeploy.device.profile import run_profile

    return run_profile(Path(export_dir), Path(out), options or ProfileOptions(),
                       command="hpqdeploy.profile (Python API)")

