"""The plan's steps on directories: `train` a baseline, `compress` it (hybrid, prune-only or quant-only).

Both are built of the library's in-memory calls (`hpqdeploy.core.planning`, `hpqdeploy.training.loop`, `hpqdeploy.artifact`);
this module adds what a command needs around them: data, resumable work directories, metrics and provenance.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from hpqdeploy import artifact, atomic, formats

from hpqdeploy.config import CompressOptions, ComputeOptions, DataOptions, TrainConfig
from hpqdeploy.core import planning
from hpqdeploy.core.bitalloc import LayerBits, low_bit_share
from hpqdeploy.core.prune import FadeOut, GroupDecision
from hpqdeploy.core.reconstruct import reconstruct
from hpqdeploy.core.targets import load_target
from hpqdeploy.data import Splits, load_data
from hpqdeploy.denormals import subnormals_flushed
from hpqdeploy.errors import UserError
from hpqdeploy.hooks import forward, to_device
from hpqdeploy.metrics import count_macs, count_params, param_breakdown, weight_bytes
from hpqdeploy.models import load_model
from hpqdeploy.models.spec import LoadedModel
from hpqdeploy.training import distributed
from hpqdeploy.training.compute import Compute
from hpqdeploy.training.loop import evaluate, finetune, loader, refuse_changed_options


def _data_loaders(loaded: LoadedModel, splits: Splits, cfg: TrainConfig, calib_batches: int, compute: Compute):
    train = loader(splits.train, loaded.collate, cfg.batch_size, shuffle=True, seed=cfg.seed, compute=compute)
    evaluation = loader(distributed.shard(splits.eval), loaded.collate, 128 if loaded.modality == "image" else 64,
                        shuffle=False, compute=compute)
    calib = list(loader(splits.calib, loaded.collate, cfg.batch_size, shuffle=False))[:calib_batches]
    return train, evaluation, calib


def _write(path: Path, blob: dict) -> None:
    atomic.write_file(path, lambda tmp: torch.save(blob, tmp))


def _to_cpu(loaded: LoadedModel) -> None:
    """The model as it is saved whatever trained it: on the CPU, in the default memory format."""
    loaded.module.to("cpu").to(memory_format=torch.contiguous_format)


def _parallel(compute: Compute, cfg: TrainConfig) -> dict:
    """How many ranks trained, and the global batch they made together."""
    return {"world_size": compute.ranks.world, "global_batch": cfg.batch_size * compute.ranks.world}


def _save(out: Path, loaded: LoadedModel, plan: dict, metrics: dict, provenance: dict, work: Path,
          compute: Compute) -> None:
    """Rank 0 writes the artifact; the others wait until it is in place."""
    if compute.ranks.main:
        artifact.save(out, loaded, plan, metrics, provenance, work)
    distributed.barrier()


def _describe(loaded: LoadedModel, accuracy: dict) -> dict:
    return {"accuracy": accuracy["accuracy"], "eval_loss": accuracy["loss"], "eval_examples": accuracy["examples"],
            "params": count_params(loaded.module), "params_by_part": param_breakdown(loaded.module), "macs": None,
            "bytes": weight_bytes(loaded.module)}


def _check_recipe(loaded: LoadedModel, cfg: TrainConfig) -> None:
    """The training settings this model cannot use fail here, before anything is written; doubtful ones warn."""
    if cfg.mixup > 0 and loaded.modality != "image":
        raise UserError(f"--mixup blends images; {loaded.spec.name} is a {loaded.modality} model (leave it at 0)")
    if loaded.modality == "text" and cfg.epochs > 0 and cfg.optimizer == "adam" and cfg.lr > 1e-4:
        warnings.warn(f"lr {cfg.lr:g} is high for fine-tuning a pretrained transformer with Adam (usual: 2e-5 to "
                      "1e-4)", stacklevel=2)


def check_modality(loaded: LoadedModel, splits: Splits) -> None:
    if loaded.modality != splits.info.modality:
        raise UserError(f"{loaded.spec.name} is a{'n' if loaded.modality == 'image' else ''} {loaded.modality} model; "
                        f"{splits.info.name} is {splits.info.modality} data")


@torch.no_grad()
def _check_compatible(loaded: LoadedModel, splits: Splits) -> None:
    """One forward pass on two real examples before anything is written: shape mismatches fail here, clearly."""
    check_modality(loaded, splits)
    inputs, _ = loaded.collate([splits.eval[i] for i in range(min(2, len(splits.eval)))])
    loaded.module.eval()
    try:
        logits = forward(loaded.module, inputs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"{loaded.spec.name} cannot take {splits.info.name} inputs: "
                        f"{str(exc).splitlines()[0][:160]}") from None
    if logits.shape[-1] != splits.info.num_classes:
        raise UserError(f"{loaded.spec.name} predicts {logits.shape[-1]} classes, {splits.info.name} has "
                        f"{splits.info.num_classes}")


def run_train(model_name: str, data: DataOptions, out: Path, cfg: TrainConfig, weights: Path | None = None,
              max_length: int = 64, quiet: bool = False, resume: bool = False, command: str = "",
              scratch: bool = False, head_dropout: float | None = None,
              compute_options: ComputeOptions | None = None) -> dict:
    """Step 1 of the plan: a baseline, trained or fine-tuned, with its accuracy and size recorded."""
    atomic.check_output(out)
    compute = Compute(compute_options)
    quiet = quiet or not compute.ranks.main
    torch.manual_seed(cfg.seed)  # before the model is built: a model without pretrained weights starts from it
    splits = load_data(data.name, data.request(cfg.seed))
    info = splits.info
    if (Path(model_name) / "plan.json").is_file():  # a saved artifact of this tool: keep training it
        if head_dropout is not None:
            raise UserError(f"--dropout is set when a text model is built; {model_name} is a saved artifact")
        loaded = artifact.load(Path(model_name)).model
    else:
        loaded = load_model(model_name, num_classes=info.num_classes, input_shape=info.input_shape,
                            weights=weights, max_length=max_length, pretrained=not scratch, head_dropout=head_dropout)
    cfg = replace(cfg.with_batch(loaded.modality), distill=0.0)  # a baseline learns from labels alone
    _check_recipe(loaded, cfg)
    _check_compatible(loaded, splits)
    torch.manual_seed(cfg.seed)
    train, evaluation, _ = _data_loaders(loaded, splits, cfg, 0, compute)
    compute.place(loaded.module)
    work = atomic.partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    history = finetune(loaded.module, train, cfg, work / "train.ckpt", resume=resume, quiet=quiet, compute=compute)
    acc = evaluate(loaded.module, evaluation, quiet=quiet, compute=compute)
    _to_cpu(loaded)
    fp32 = weight_bytes(loaded.module)["total"]
    metrics = {"format_version": formats.VERSIONS["metrics.json"], "method": "baseline", **_describe(loaded, acc),
               "macs": count_macs(loaded.module, loaded.example_inputs), "fp32_bytes": fp32, "compression": 1.0,
               "train_seconds": round(time.time() - start, 1), **_parallel(compute, cfg), "history": history}
    plan = {"model": loaded.spec.to_json(), "method": "baseline", "data": asdict(data), "pruning": [],
            "quantization": {}, "target": None}
    provenance = {"command": command, "config": {"train": asdict(cfg), "data": asdict(data), "model": model_name,
                                                 "weights": str(weights) if weights else None, "scratch": scratch,
                                                 "head_dropout": head_dropout},
                  "compute": compute.describe(),
                  "seed": cfg.seed, **artifact.environment()}
    _save(out, loaded, plan, metrics, provenance, work, compute)
    return metrics


def _pruned_dimensions(pruning: list[GroupDecision]) -> dict[str, dict]:
    """Per kind of unit (conv channels, attention heads, FFN neurons): groups, units before and after."""
    out: dict[str, dict] = {}
    for d in pruning:
        k = out.setdefault(d.kind, {"groups": 0, "units": 0, "kept": 0})
        k["groups"] += 1
        k["units"] += d.units
        k["kept"] += d.kept
    return out


@subnormals_flushed()  # the analysis too: a baseline trained elsewhere may hold subnormal weights
def run_compress(baseline_dir: Path, out: Path, opts: CompressOptions, data: DataOptions | None = None,
                 quiet: bool = False, resume: bool = False, command: str = "",
                 compute_options: ComputeOptions | None = None) -> dict:
    """Prune and/or quantize a baseline, fine-tune once, evaluate, and write the artifact: `planning.plan`'s and
    `planning.apply`'s steps, with the (experimental) fading and reconstruction between them where asked for."""
    atomic.check_output(out)
    compute = Compute(compute_options)
    main = compute.ranks.main
    quiet = quiet or not main
    target = load_target(opts.target)
    base = artifact.load(baseline_dir)
    if base.plan.get("method") != "baseline":
        raise UserError(f"{baseline_dir} is a {base.plan.get('method')} artifact; compress a `hpqdeploy train` output")
    data = data or DataOptions(**base.plan["data"])
    loaded = base.model
    opts = replace(opts, train=opts.train.with_batch(loaded.modality))
    cfg = opts.train
    torch.manual_seed(cfg.seed)
    splits = load_data(data.name, data.request(cfg.seed))
    model = loaded.module
    check_modality(loaded, splits)
    _check_recipe(loaded, cfg)
    train, evaluation, calib = _data_loaders(loaded, splits, cfg, opts.calib_batches, compute)
    model = compute.place(model)
    example = to_device(loaded.example_inputs, compute.device)
    work = atomic.partial_dir(out)
    with distributed.main_first() as first:
        if first and work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pruning, quant_plan = [], {}
    teacher = copy.deepcopy(model) if cfg.distill > 0 else None
    original = None  # the unpruned model, which reconstruction fits the pruned layers to
    if opts.reconstruct and opts.method != "quant":
        original = teacher if teacher is not None else copy.deepcopy(model)
    reconstruction = {}
    analysis = work / "analysis.pt"
    saved = torch.load(analysis, weights_only=True) if resume and analysis.exists() else {}
    distributed.barrier()  # every rank has read the interrupted run's decisions before rank 0 rewrites them
    options = {**asdict(opts), "data": asdict(data)}
    if "options" in saved:  # the decisions were made with these; other options would mix two runs (the
        refuse_changed_options(json.loads(saved["options"]), options, f"{out}")  # interrupted run is kept)
    try:
        if "pruning" in saved:  # reuse the decisions the interrupted run made, then its checkpoints
            pruning = [GroupDecision.from_json(d) for d in saved["pruning"]]
        else:  # made once, on rank 0, and the same on every rank
            pruning = planning.decide_pruning(model, example, calib, opts, target) if main else []
            pruning = [GroupDecision.from_json(d) for d in distributed.broadcast([d.to_json() for d in pruning])]
        if main:
            _write(analysis, {"pruning": [d.to_json() for d in pruning], "options": json.dumps(options)})
        cut = any(d.removed for d in pruning)
        fade = opts.fade_epochs() if cut else 0
        history, fade_seconds = saved.get("fade_history", []), time.time()
        if fade and not (resume and (work / "compress.ckpt").exists()):
            gates = FadeOut(model, example, pruning)
            with gates.attached():
                history = finetune(model, train, cfg, work / "fade.ckpt", resume=resume, quiet=quiet,
                                   teacher=teacher, span=range(fade), before_step=gates.schedule, compute=compute)
        fade_seconds = time.time() - fade_seconds
        planning.prune(model, example, pruning)
        if original is not None and cut:
            reconstruction = reconstruct(model, original, example, pruning, calib)
        if "bits" in saved:
            quant_plan = {n: LayerBits.from_json(lb) for n, lb in json.loads(saved["bits"]).items()}
        else:
            quant_plan = planning.decide_bits(model, calib, opts, target) if main else {}
            decided = distributed.broadcast({n: lb.to_json() for n, lb in quant_plan.items()})
            quant_plan = {n: LayerBits.from_json(lb) for n, lb in decided.items()}
        plan = planning.to_json(opts, target, pruning, quant_plan)
        if main:
            _write(analysis, {"pruning": plan["pruning"], "fade_history": history, "options": json.dumps(options),
                              "bits": json.dumps(plan["bits"])})
        macs = count_macs(model, example)
        model, _ = planning.attach_quantizers(model, quant_plan, calib, target)
        distributed.sync_ranges(model)
        loaded.module = model
        analysis_seconds = time.time() - start - fade_seconds
        history += finetune(model, train, cfg, work / "compress.ckpt", resume=resume, quiet=quiet, teacher=teacher,
                            span=range(fade, cfg.epochs), compute=compute)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    acc = evaluate(model, evaluation, quiet=quiet, compute=compute)
    _to_cpu(loaded)
    size = weight_bytes(model)
    share = low_bit_share(quant_plan, model, min(opts.bits)) if quant_plan else 0.0
    if quant_plan and share + 0.01 < opts.low_bit_share:
        warnings.warn(f"low-bit share {share:.2f} is below the budget {opts.low_bit_share:.2f}: "
                      f"{target.name} runs {min(opts.bits)}-bit weights only for some layers", stacklevel=2)
    fp32 = base.metrics["fp32_bytes"]
    metrics = {
        "format_version": formats.VERSIONS["metrics.json"], "method": opts.method, **_describe(loaded, acc),
        "macs": macs,
        "fp32_bytes": fp32, "compression": round(fp32 / size["total"], 3),
        "baseline": {k: base.metrics[k] for k in ("accuracy", "params", "macs", "fp32_bytes")},
        "params_ratio": round(count_params(model) / base.metrics["params"], 4),
        "macs_ratio": round(macs / base.metrics["macs"], 4),
        "bytes_ratio": round(size["total"] / fp32, 4),
        "accuracy_drop": round(base.metrics["accuracy"] - acc["accuracy"], 4),
        "low_bit_share": round(share, 4), "low_bit_budget": opts.low_bit_share if quant_plan else 0.0,
        "pruned_dimensions": _pruned_dimensions(pruning), "fade_epochs": fade,
        "reconstruction": {n: {k: round(v, 4) for k, v in r.items()} for n, r in reconstruction.items()} or None,
        "analysis_seconds": round(analysis_seconds, 1), **_parallel(compute, cfg),
        "finetune_seconds": round(time.time() - start - analysis_seconds, 1),
        "history": history,
    }
    record = artifact.plan_record(loaded.spec, asdict(data), plan, model)
    provenance = {"command": command, "baseline": str(baseline_dir),
                  "config": {**asdict(opts), "data": asdict(data)}, "compute": compute.describe(), "seed": cfg.seed,
                  **artifact.environment()}
    _save(out, loaded, record, metrics, provenance, work, compute)
    return metrics
