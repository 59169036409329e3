"""Training and evaluation loops shared by `train` (the baseline) and `compress` (recovery fine-tuning)."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hpqdeploy import atomic
from hpqdeploy.config import TrainConfig
from hpqdeploy.denormals import subnormals_flushed
from hpqdeploy.errors import UserError
from hpqdeploy.hooks import forward, forward_hooks
from hpqdeploy.training import distributed
from hpqdeploy.training.compute import Compute


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The plan's Adam, or SGD with Nesterov momentum 0.9: the usual recipe for CIFAR ResNets, at a larger `lr`
    (0.01-0.1) than Adam's."""
    lr = cfg.lr * (distributed.ranks().world if cfg.scale_lr else 1)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, steps: int, warmup_steps: int = 0) -> float:
    """The learning rate's multiplier at `step` of `steps`: linear warmup, then cosine decay to 0 at the end.

    Warmup keeps Adam's first, poorly estimated updates from wiping out what a pretrained or pruned-and-refitted
    model already knows."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = min(step, steps) - warmup_steps
    return 0.5 * (1 + math.cos(math.pi * done / max(1, steps - warmup_steps)))


def loader(dataset: Dataset, collate: Callable, batch_size: int, shuffle: bool, seed: int = 0,
           compute: Compute | None = None) -> DataLoader:
    """Batches in a seeded order; with `compute`'s workers made in worker processes (kept between epochs) and,
    for CUDA, in pinned memory."""
    gen = torch.Generator().manual_seed(seed)
    workers = compute.workers if compute is not None else 0
    sampler = None
    if shuffle and distributed.ranks().active:  # each rank its part of every epoch, reshuffled per epoch
        sampler, shuffle = DistributedSampler(dataset, shuffle=True, seed=seed), False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate,
                      generator=gen, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=compute is not None and compute.pin_memory)


def progress(quiet: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), disable=quiet, transient=True)


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader, quiet: bool = True, compute: Compute | None = None) -> dict:
    compute = compute or Compute.here(model)
    model.eval()
    correct = total = 0
    loss = 0.0
    with progress(quiet) as bar:
        task = bar.add_task("evaluate", total=len(data), status="")
        for inputs, labels in data:
            inputs, labels = compute.batch(inputs, labels)
            with compute.autocast():
                logits = forward(model, inputs).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
            bar.update(task, advance=1, status=f"acc {correct / total:.4f}")
    loss, correct, total = distributed.all_sum([loss, correct, total], compute.device)  # every rank's shard
    correct, total = int(correct), int(total)
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1), "examples": total}


@dataclass
class Mix:
    """One mixup draw: the batch was blended as `weight * x + (1 - weight) * x[partner]`."""
    weight: float
    partner: torch.Tensor


def mixup(inputs, cfg: TrainConfig) -> tuple[torch.Tensor, Mix | None]:
    """Blend each image with another of the batch (Zhang et al., 2018) when `cfg.mixup` > 0.

    With distillation the teacher sees the same blend, so the student learns the teacher's function between the
    training images too ("function matching", Beyer et al., 2022), not only at them."""
    if cfg.mixup <= 0:
        return inputs, None
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise UserError("--mixup blends images; this model's inputs are not float tensors (text: leave it at 0)")
    weight = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
    partner = torch.randperm(inputs.shape[0])
    return weight * inputs + (1 - weight) * inputs[partner], Mix(weight, partner)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                  cfg: TrainConfig, mix: Mix | None = None) -> torch.Tensor:
    """Cross-entropy (on both labels of a mixup blend, by their weights), mixed with Hinton distillation from the
    uncompressed model when `cfg.distill` > 0."""
    ce = F.cross_entropy(logits, labels)
    if mix is not None:
        ce = mix.weight * ce + (1 - mix.weight) * F.cross_entropy(logits, labels[mix.partner])
    if teacher_logits is None or cfg.distill <= 0:
        return ce
    t = cfg.temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                  log_target=True, reduction="batchmean") * t * t
    return (1 - cfg.distill) * ce + cfg.distill * kd


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a feature map (Zagoruyko & Komodakis, 2017): the channel mean of squared activations,
    flattened and L2-normalised. It needs no projection, so a pruned student with fewer channels can match its
    teacher's map directly."""
    return F.normalize(features.pow(2).mean(1).flatten(1), dim=1)


class FeatureTap:
    """Keeps the outputs of named submodules from the latest forward pass, inside `with tap.attached():`."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no submodule named {', '.join(missing)}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._names = {modules[n]: n for n in names}

    def _keep(self, module: nn.Module, _args, output: torch.Tensor) -> None:
        self.outputs[self._names[module]] = output

    def attached(self):
        """Context manager: the outputs are kept inside the block."""
        return forward_hooks(self._names, self._keep)


def attention_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared difference of attention maps, summed over the tapped layers, halved as in the paper."""
    return sum((attention_map(student[n]) - attention_map(teacher[n])).pow(2).mean() for n in teacher) / 2


@contextmanager
def attention_taps(model: nn.Module, teacher: nn.Module | None, cfg: TrainConfig):
    """(student tap, teacher tap) while training when attention transfer is on, else None; hooks removed after."""
    if teacher is None or cfg.distill <= 0 or cfg.attention <= 0 or not cfg.attention_layers:
        yield None
        return
    student, taught = FeatureTap(model, cfg.attention_layers), FeatureTap(teacher, cfg.attention_layers)
    with student.attached(), taught.attached():
        yield student, taught


def option_name(key: str) -> str:
    """A setting's command-line spelling: `prune_ratio` -> `--prune-ratio`, `train.lr` -> `--lr`."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def refuse_changed_options(saved: dict | None, current: dict, what: str) -> None:
    """A run resumes only with the options it was started with: anything else would mix two runs' decisions."""
    if saved is None:
        return
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    changed = [k for k in flat_now if k in flat_saved and flat_saved[k] != flat_now[k]]
    if changed:
        diffs = ", ".join(f"{option_name(k)} {_show(flat_saved[k])} (now {_show(flat_now[k])})" for k in changed)
        raise UserError(f"--resume: {what} was started with {diffs}; resume with the same options, or start anew "
                        "without --resume")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _show(v) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, list) else str(v)


def random_state(data: DataLoader) -> dict:
    """Every random generator the next epoch draws from: torch's (augmentation, dropout, mixup), the data loader's
    own (the shuffle order), numpy's and Python's. A run resumed from it continues as the uninterrupted run would."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [list(random.getstate()[1]), random.getstate()[2]]}
    generator = getattr(data, "generator", None)  # a DataLoader's shuffle order (any iterable of batches works)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def restore_random_state(state: dict, data: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_pos"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version = random.getstate()[0]
    random.setstate((version, tuple(state["python"][0]), state["python"][1]))
    generator = getattr(data, "generator", None)
    if "loader" in state and generator is not None:
        generator.set_state(state["loader"])


@subnormals_flushed()
def finetune(model: nn.Module, data: DataLoader, cfg: TrainConfig, checkpoint: Path | None = None,
             resume: bool = False, quiet: bool = False, teacher: nn.Module | None = None,
             span: range | None = None, before_step: Callable[[int, int], None] | None = None,
             compute: Compute | None = None) -> list[dict]:
    """`cfg.optimizer` (Adam by default) with weight decay and a cosine schedule (after `cfg.warmup` epochs of
    linear warmup); a checkpoint after every epoch, resumable with the same optimizer.

    With a `teacher` (the uncompressed model) and `cfg.distill` > 0, the loss adds knowledge distillation: the
    standard way to recover a compressed model's accuracy within a small fine-tuning budget.
    With distillation on and `cfg.attention` > 0 it also matches the teacher's spatial attention at
    `cfg.attention_layers` (the teacher runs only when distilling). With `cfg.mixup` > 0 every batch is a mixup
    blend, and the teacher is shown the same blend.
    `span` trains only those epochs of the `cfg.epochs`-long schedule (a run in phases: the learning rate goes on
    where the previous phase left it); `before_step(step, steps)` is called before each step of the span.
    Subnormal floats are flushed to zero on every thread while it runs (`hpqdeploy.denormals`).
    """
    if teacher is not None:
        teacher.eval()
    span = range(cfg.epochs) if span is None else span
    if len(span) <= 0:
        return []
    torch.manual_seed(cfg.seed + span.start)
    compute = compute or Compute.here(model)
    scaler = compute.scaler()
    main = distributed.ranks().main
    opt = make_optimizer(model.parameters(), cfg)
    steps, offset = cfg.epochs * len(data), span.start * len(data)
    warmup_steps = min(steps, round(cfg.warmup * len(data)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + offset, steps, warmup_steps))
    start, history = span.start, []
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        used = state.get("optimizer_name", "adam")  # checkpoints from before --optimizer are Adam's
        if used != cfg.optimizer:
            raise UserError(f"--resume: {checkpoint} was trained with --optimizer {used}, not {cfg.optimizer}")
        refuse_changed_options(state.get("config"), asdict(cfg), str(checkpoint))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]), list(state.get("history", []))
        if "random" in state:
            restore_random_state(state["random"], data)
    trained = distributed.wrap(model, compute.device, compute.options.sync_bn)  # DDP under torchrun
    with attention_taps(model, teacher, cfg) as taps, progress(quiet or not main) as bar:
        for epoch in range(start, span.stop):
            if isinstance(getattr(data, "sampler", None), DistributedSampler):
                data.sampler.set_epoch(epoch)
            model.train()
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(data), status="")
            running, seen = 0.0, 0
            for i, (inputs, labels) in enumerate(data):
                if before_step is not None:
                    before_step((epoch - span.start) * len(data) + i, len(span) * len(data))
                inputs, labels = compute.batch(inputs, labels)
                inputs, mix = mixup(inputs, cfg)
                teacher_logits = None
                with compute.autocast():
                    if teacher is not None and cfg.distill > 0:
                        with torch.no_grad():
                            teacher_logits = forward(teacher, inputs).float()
                    loss = training_loss(forward(trained, inputs).float(), labels, teacher_logits, cfg, mix)
                    if taps is not None:
                        loss = loss + cfg.attention * attention_loss(taps[0].outputs, taps[1].outputs)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                running += loss.item() * labels.numel()
                seen += labels.numel()
                bar.update(task, advance=1, status=f"loss {running / seen:.4f}")
            bar.remove_task(task)
            history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1),
                            "lr": opt.param_groups[0]["lr"]})
            if checkpoint is not None and main:  # rank 0 writes; every rank reads it on --resume
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "optimizer_name": cfg.optimizer, "scheduler": sched.state_dict(), "epoch": epoch + 1,
                         "history": history, "random": random_state(data), "config": asdict(cfg)}
                atomic.write_file(checkpoint, lambda tmp, state=state: torch.save(state, tmp))
    if distributed.ranks().active:  # DDP keeps the replicas equal; a run that drifted must not be saved
        distributed.broadcast_buffers(model)  # the last step's BatchNorm statistics and ranges: rank 0's
        distributed.check_same(distributed.state_digest(model), "the fine-tuned parameters")
    return history
