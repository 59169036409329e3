"""The compression plan as data, and applying it to a model in memory.

    plan = planning.plan(model, example_inputs, calibration, CompressOptions(method="hybrid", prune_ratio=0.3))
    model = planning.apply(model, plan, calibration)   # pruned, fake-quantized, still trainable

`calibration` is a list of `(inputs, labels)` batches (inputs: a tensor, or a dict of tensors for text models); the
labels are what the `taylor` criterion takes gradients against. A plan is plain JSON-serialisable data: which units
each pruning group loses, and each layer's bit width per output channel, activation bits and group size. A user may
read it, edit it, save it and apply it later; `compress` runs the same calls.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.nn as nn

from hpqdeploy import formats
from hpqdeploy.config import CompressOptions
from hpqdeploy.core import quant_points
from hpqdeploy.core.bitalloc import LayerBits, plan_bits
from hpqdeploy.core.prune import GroupDecision, apply_pruning, is_transformer, plan_pruning
from hpqdeploy.core.quantize import attach, calibrate, quantizable_layers, search_clip
from hpqdeploy.core.targets import Target, load_target
from hpqdeploy.errors import UserError


def pruning_multiple(model: nn.Module, opts: CompressOptions, target: Target) -> int:
    """The target's channel multiple; for transformers under a per-group low-bit target also the group size, so
    the FFN output projection (whose inputs are the pruned neurons) can still be quantized in whole groups."""
    multiple = target.channel_multiple
    group = target.support("linear").group_size_for(min(opts.bits))
    if is_transformer(model) and opts.method == "hybrid" and group:
        multiple = math.lcm(multiple, group)
    return multiple


def decide_pruning(model: nn.Module, example_inputs: Any, calibration: list, opts: CompressOptions,
                   target: Target) -> list[GroupDecision]:
    """Which units each group loses (none for quant-only); `model` is left as it was."""
    if opts.method not in ("hybrid", "prune"):
        return []
    return plan_pruning(model, example_inputs, calibration, opts.prune_ratio, pruning_multiple(model, opts, target),
                        opts.importance)


def decide_bits(pruned: nn.Module, calibration: list, opts: CompressOptions, target: Target) -> dict[str, LayerBits]:
    """Each layer's bit widths per output channel, measured on the pruned model (left as it was)."""
    if opts.method not in ("hybrid", "quant"):
        return {}
    return plan_bits(copy.deepcopy(pruned), calibration, target, tuple(opts.bits), opts.low_bit_share,
                     opts.importance, opts.act_bits)


def to_json(opts: CompressOptions, target: Target, pruning: list[GroupDecision],
            bits: dict[str, LayerBits]) -> dict:
    """The plan as data."""
    return {"format_version": formats.VERSIONS["plan"], "method": opts.method, "target": target.name,
            "channel_multiple": target.channel_multiple, "isa_family": target.isa_family,
            "options": {k: v for k, v in asdict(opts).items() if k != "train"},
            "pruning": [d.to_json() for d in pruning],
            "bits": {n: lb.to_json() for n, lb in bits.items()}}


def plan(model: nn.Module, example_inputs: Any, calibration: list,
         config: CompressOptions | None = None) -> dict:
    """Importance, sensitivity and the pruning and bit allocation for `model`, which is not changed."""
    opts = config or CompressOptions()
    target = load_target(opts.target)
    pruning = decide_pruning(model, example_inputs, calibration, opts, target)
    pruned = apply_pruning(copy.deepcopy(model), example_inputs, pruning) if pruning else model
    return to_json(opts, target, pruning, decide_bits(pruned, calibration, opts, target))


def read(plan: dict) -> tuple[list[GroupDecision], dict[str, LayerBits], str | None]:
    """(pruning decisions, bit plan, target name) of a plan; a malformed one is one UserError."""
    if not isinstance(plan, dict) or "pruning" not in plan or "bits" not in plan:
        raise UserError("not a compression plan: it needs 'pruning' and 'bits' (see hpqdeploy.plan)")
    formats.check(Path("plan"), plan)
    try:
        pruning = [GroupDecision.from_json(d) for d in plan["pruning"]]
        bits = {n: LayerBits.from_json(b) for n, b in plan["bits"].items()}
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"the plan is malformed ({exc})") from None
    return pruning, bits, plan.get("target")


def prune(model: nn.Module, example_inputs: Any, pruning: list[GroupDecision]) -> nn.Module:
    """Remove the planned units in place; a group the model lacks is one UserError."""
    try:
        return apply_pruning(model, example_inputs, pruning)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def attach_quantizers(model: nn.Module, bits: dict[str, LayerBits], calibration: list,
                      target: Target) -> tuple[nn.Module, quant_points.Points | None]:
    """Fake quantization per the plan: MSE-searched weight clipping; where layers take static activations, the
    quantization points between them that the target's integer kernels need (the model is then its fx graph, a new
    module); activation ranges from calibration. Returns the quantized model and its points."""
    layers = quantizable_layers(model)
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise UserError(f"the plan quantizes layer {unknown[0]!r}, which the model does not have")
    for name, lb in bits.items():
        m = attach(layers[name], lb.bits, lb.act_bits, lb.group_size)
        m.act_dynamic = lb.act_dynamic
        m.w_clip.copy_(search_clip(m.weight.detach(), m.w_bits, m.group_size))
    points = None
    static = sorted({lb.act_bits for lb in bits.values() if lb.act_bits and not lb.act_dynamic})
    if static and target.quantized_ops:
        points = quant_points.insert_points(model, target.quantized_ops, static[-1])
        if points is not None:
            model = points.model
            model.hpq_points = points  # what `save` records in plan.json
    if bits:
        calibrate(model, calibration)
    return model, points


def apply(model: nn.Module, plan: dict, calibration: list, example_inputs: Any = None) -> nn.Module:
    """The model pruned and fake-quantized as `plan` says, ready to fine-tune in any training loop.

    Pruning happens in place; the returned module is the one to train (where quantization points are inserted
    it is a new `torch.fx.GraphModule` holding the same layers). `example_inputs` default to the first calibration
    batch's inputs."""
    pruning, bits, target_name = read(plan)
    if example_inputs is None:
        if not calibration:
            raise UserError("apply needs calibration batches (or example_inputs and no quantization)")
        example_inputs = calibration[0][0]
    if pruning:
        prune(model, example_inputs, pruning)
    model, _ = attach_quantizers(model, bits, calibration, load_target(target_name))
    return model
