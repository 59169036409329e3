"""The plan's steps as library calls: `train` a baseline, `compress` it (hybrid, prune-only or quant-only)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hpqdeploy import artifact, formats, quant_points
from hpqdeploy.bitalloc import LayerBits, check_bits, low_bit_share, plan_bits
from hpqdeploy.data import DataRequest, Splits, load_data
from hpqdeploy.denormals import subnormals_flushed
from hpqdeploy.errors import UserError
from hpqdeploy.finetune import TrainConfig, evaluate, finetune, loader, refuse_changed_options
from hpqdeploy.hooks import forward
from hpqdeploy.importance import CRITERIA
from hpqdeploy.metrics import count_macs, count_params, param_breakdown, weight_bytes
from hpqdeploy.models import LoadedModel, load_model
from hpqdeploy.prune import FadeOut, GroupDecision, apply_pruning, plan_pruning
from hpqdeploy.quantize import attach, calibrate, quantizable_layers, search_clip
from hpqdeploy.reconstruct import reconstruct
from hpqdeploy.targets import load_target

METHODS = ("hybrid", "prune", "quant")


@dataclass
class DataOptions:
    name: str
    data_dir: str | None = None
    calib_size: int = 512
    train_limit: int | None = None
    eval_limit: int | None = None

    def validate(self) -> None:
        """Bounds checked before any work starts (a calibration split is what compress measures importance on)."""
        if self.calib_size < 1:
            raise UserError(f"--calib-size must be >= 1 (the examples held out to calibrate on), got {self.calib_size}")
        for flag, value in (("--train-limit", self.train_limit), ("--eval-limit", self.eval_limit)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be >= 1 (or left out for all), got {value}")

    def request(self, seed: int) -> DataRequest:
        return DataRequest(Path(self.data_dir) if self.data_dir else None, seed, self.calib_size,
                           self.train_limit, self.eval_limit)


@dataclass
class CompressOptions:
    method: str = "hybrid"
    prune_ratio: float = 0.3
    bits: tuple[int, ...] = (8, 4)
    low_bit_share: float = 0.5
    act_bits: int | None = 8
    importance: str = "taylor"
    target: str | None = None
    calib_batches: int = 8
    train: TrainConfig = field(default_factory=lambda: TrainConfig(distill=0.9))
    fade: float = 0.0  # share of the fine-tuning epochs over which pruned channels fade out (0: one-shot removal)
    reconstruct: bool = False  # after one-shot removal, re-fit the layers that lost inputs (least squares)

    def fade_epochs(self) -> int:
        """Whole epochs of fading, leaving at least one epoch to fine-tune the pruned (and quantized) model."""
        return max(0, min(round(self.fade * self.train.epochs), self.train.epochs - 1))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.prune_ratio < 1.0:
            raise UserError(f"--prune-ratio must be in (0, 1), got {self.prune_ratio}")
        if self.importance not in CRITERIA:
            raise UserError(f"unknown importance criterion {self.importance!r}; choose one of {', '.join(CRITERIA)}")
        if self.method != "prune":
            check_bits(tuple(self.bits))
            if not 0.0 <= self.low_bit_share <= 1.0:
                raise UserError(f"--low-bit-share must be within [0, 1], got {self.low_bit_share}")
        if not 0.0 <= self.fade < 1.0:
            raise UserError(f"--fade must be in [0, 1), got {self.fade}")
        if self.reconstruct and self.fade > 0:
            raise UserError("--reconstruct re-fits layers after channels are removed at once; "
                            "it does not go with --fade")
        self.train.validate()


def _pruning_multiple(loaded: LoadedModel, opts: CompressOptions, target) -> int:
    """The target's channel multiple; for transformers under a per-group low-bit target also the group size, so
    the FFN output projection (whose inputs are the pruned neurons) can still be quantized in whole groups."""
    multiple = target.channel_multiple
    group = target.support("linear").group_size_for(min(opts.bits))
    if loaded.modality == "text" and opts.method == "hybrid" and group:
        multiple = math.lcm(multiple, group)
    return multiple


def _data_loaders(loaded: LoadedModel, splits: Splits, cfg: TrainConfig, calib_batches: int):
    train = loader(splits.train, loaded.collate, cfg.batch_size, shuffle=True, seed=cfg.seed)
    evaluation = loader(splits.eval, loaded.collate, 128 if loaded.modality == "image" else 64, shuffle=False)
    calib = list(loader(splits.calib, loaded.collate, cfg.batch_size, shuffle=False))[:calib_batches]
    return train, evaluation, calib


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
              scratch: bool = False, head_dropout: float | None = None) -> dict:
    """Step 1 of the plan: a baseline, trained or fine-tuned, with its accuracy and size recorded."""
    artifact.check_output(out)
    cfg.validate()
    data.validate()
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
    _check_recipe(loaded, cfg)
    _check_compatible(loaded, splits)
    torch.manual_seed(cfg.seed)
    train, evaluation, _ = _data_loaders(loaded, splits, cfg, 0)
    work = artifact.partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    history = finetune(loaded.module, train, cfg, work / "train.ckpt", resume=resume, quiet=quiet)
    acc = evaluate(loaded.module, evaluation, quiet=quiet)
    fp32 = weight_bytes(loaded.module)["total"]
    metrics = {"format_version": formats.VERSIONS["metrics.json"], "method": "baseline", **_describe(loaded, acc),
               "macs": count_macs(loaded.module, loaded.example_inputs), "fp32_bytes": fp32, "compression": 1.0,
               "train_seconds": round(time.time() - start, 1), "history": history}
    plan = {"model": loaded.spec.to_json(), "method": "baseline", "data": asdict(data), "pruning": [],
            "quantization": {}, "target": None}
    provenance = {"command": command, "config": {"train": asdict(cfg), "data": asdict(data), "model": model_name,
                                                 "weights": str(weights) if weights else None, "scratch": scratch,
                                                 "head_dropout": head_dropout},
                  "seed": cfg.seed, **artifact.environment()}
    artifact.save(out, loaded, plan, metrics, provenance, work)
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


def _attach_quantizers(loaded: LoadedModel, quant_plan: dict[str, LayerBits], calib: list, target
                       ) -> quant_points.Points | None:
    """Fake quantization per the plan: MSE-searched weight clipping; where layers take static 8-bit activations, the
    quantization points between them that the target's integer kernels need (the model becomes its fx graph:
    `loaded.module` is replaced); then activation ranges from calibration."""
    layers = quantizable_layers(loaded.module)
    for name, lb in quant_plan.items():
        m = attach(layers[name], lb.bits, lb.act_bits, lb.group_size)
        m.act_dynamic = lb.act_dynamic
        m.w_clip.copy_(search_clip(m.weight.detach(), m.w_bits, m.group_size))
    points = None
    static = sorted({lb.act_bits for lb in quant_plan.values() if lb.act_bits and not lb.act_dynamic})
    if static and target.quantized_ops:
        points = quant_points.insert_points(loaded.module, target.quantized_ops, static[-1])
        if points is not None:
            loaded.module = points.model
    if quant_plan:
        calibrate(loaded.module, calib)
    return points


@subnormals_flushed()  # the analysis too: a baseline trained elsewhere may hold subnormal weights
def run_compress(baseline_dir: Path, out: Path, opts: CompressOptions, data: DataOptions | None = None,
                 quiet: bool = False, resume: bool = False, command: str = "") -> dict:
    """Prune and/or quantize a baseline, fine-tune once, evaluate, and write the artifact."""
    opts.validate()
    artifact.check_output(out)
    target = load_target(opts.target)
    base = artifact.load(baseline_dir)
    if base.plan.get("method") != "baseline":
        raise UserError(f"{baseline_dir} is a {base.plan.get('method')} artifact; compress a `hpqdeploy train` output")
    data = data or DataOptions(**base.plan["data"])
    data.validate()
    cfg = opts.train
    torch.manual_seed(cfg.seed)
    splits = load_data(data.name, data.request(cfg.seed))
    loaded = base.model
    model = loaded.module
    check_modality(loaded, splits)
    _check_recipe(loaded, cfg)
    train, evaluation, calib = _data_loaders(loaded, splits, cfg, opts.calib_batches)
    work = artifact.partial_dir(out)
    if work.exists() and not resume:
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
    options = {**asdict(opts), "data": asdict(data)}
    if "options" in saved:  # the decisions were made with these; other options would mix two runs (the
        refuse_changed_options(json.loads(saved["options"]), options, f"{out}")  # interrupted run is kept)
    try:
        if "pruning" in saved:  # reuse the decisions the interrupted run made, then its checkpoints
            pruning = [GroupDecision.from_json(d) for d in saved["pruning"]]
        elif opts.method in ("hybrid", "prune"):
            pruning = plan_pruning(model, loaded.example_inputs, calib, opts.prune_ratio,
                                   _pruning_multiple(loaded, opts, target), opts.importance)
        torch.save({"pruning": [d.to_json() for d in pruning], "options": json.dumps(options)}, analysis)
        cut = any(d.removed for d in pruning)
        fade = opts.fade_epochs() if cut else 0
        history, fade_seconds = saved.get("fade_history", []), time.time()
        if fade and not (resume and (work / "compress.ckpt").exists()):
            gates = FadeOut(model, loaded.example_inputs, pruning)
            with gates.attached():
                history = finetune(model, train, cfg, work / "fade.ckpt", resume=resume, quiet=quiet,
                                   teacher=teacher, span=range(fade), before_step=gates.schedule)
        fade_seconds = time.time() - fade_seconds
        apply_pruning(model, loaded.example_inputs, pruning)
        if original is not None and cut:
            reconstruction = reconstruct(model, original, loaded.example_inputs, pruning, calib)
        if "quant" in saved:
            quant_plan = {n: LayerBits(**lb) for n, lb in saved["quant"].items()}
        elif opts.method in ("hybrid", "quant"):
            quant_plan = plan_bits(copy.deepcopy(model), calib, target, tuple(opts.bits), opts.low_bit_share,
                                   opts.importance, opts.act_bits)
        torch.save({"pruning": [d.to_json() for d in pruning], "fade_history": history, "options": json.dumps(options),
                    "quant": {n: asdict(lb) for n, lb in quant_plan.items()}}, analysis)
        macs = count_macs(model, loaded.example_inputs)
        points = _attach_quantizers(loaded, quant_plan, calib, target)
        model = loaded.module
        analysis_seconds = time.time() - start - fade_seconds
        history += finetune(model, train, cfg, work / "compress.ckpt", resume=resume, quiet=quiet, teacher=teacher,
                            span=range(fade, cfg.epochs))
    except UserError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    acc = evaluate(model, evaluation, quiet=quiet)
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
        "analysis_seconds": round(analysis_seconds, 1),
        "finetune_seconds": round(time.time() - start - analysis_seconds, 1),
        "history": history,
    }
    plan = {"model": loaded.spec.to_json(), "method": opts.method, "data": asdict(data),
            "target": target.name, "channel_multiple": target.channel_multiple, "isa_family": target.isa_family,
            "pruning": [d.to_json() for d in pruning],
            "quantization": artifact.describe_quantization(model),
            "activation_points": artifact.describe_points(model, points),
            "layer_sensitivity": {n: lb.sensitivity for n, lb in quant_plan.items()}}
    provenance = {"command": command, "baseline": str(baseline_dir),
                  "config": {**asdict(opts), "data": asdict(data)}, "seed": cfg.seed, **artifact.environment()}
    artifact.save(out, loaded, plan, metrics, provenance, work)
    return metrics
