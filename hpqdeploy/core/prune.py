"""Structured pruning: importance-driven allocation of kept channels, executed by torch-pruning's DepGraph.

Every coupled set of channels (a DepGraph group: a conv's filters with the BN, the next layers' inputs and the
residual stream they join) is one allocation unit; transformer attention is pruned by whole heads and the FFN by
neurons. Each group keeps a multiple of the target's preferred channel count: of the two multiples around
`units * (1 - ratio)`, the allocation picks per group so that the parameters and MACs removed overall reach what
pruning every group by exactly the ratio would remove, while the estimated output divergence is smallest. The
ratio each group really got is recorded in the plan. `FadeOut` removes the chosen units gradually while
fine-tuning, before `apply_pruning` removes them physically.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from hpqdeploy.core.importance import channel_criterion, output_divergence, reference_outputs
from hpqdeploy.hooks import evaluating, forward, forward_hooks
from hpqdeploy.models.cifar_resnet import ChannelMapShortcut


class ChannelMapShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Pruning rule for the CIFAR ResNets' zero-padding shortcut: it maps one stage's stream onto the next's."""

    TARGET_MODULES = ChannelMapShortcut

    def prune_out_channels(self, layer: ChannelMapShortcut, idxs):
        keep = torch.ones(layer.source.numel(), dtype=torch.bool)
        keep[list(idxs)] = False
        layer.source = layer.source[keep]
        return layer

    def prune_in_channels(self, layer: ChannelMapShortcut, idxs):
        removed = torch.as_tensor(sorted(idxs), dtype=torch.long)
        src = layer.source
        shift = (src.unsqueeze(1) > removed.unsqueeze(0)).sum(1)
        layer.source = torch.where(torch.isin(src, removed) | (src < 0), -1, src - shift)
        layer.in_channels -= len(removed)
        return layer

    def get_out_channels(self, layer):
        return layer.source.numel()

    def get_in_channels(self, layer):
        return layer.in_channels


CUSTOM_PRUNERS = {ChannelMapShortcut: ChannelMapShortcutPruner()}


@dataclass
class GroupDecision:
    """One pruning group as recorded in the plan. `removed` lists unit indices (channels or heads)."""

    name: str
    kind: str  # "channels" | "heads" | "ffn"
    units: int
    kept: int
    unit_channels: int = 1
    sensitivity: float | None = None  # output divergence when only this group is pruned (lower candidate)
    removed: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return 1 - self.kept / self.units

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 4)}

    @classmethod
    def from_json(cls, blob: dict) -> "GroupDecision":
        return cls(**{k: v for k, v in blob.items() if k != "ratio"})


@dataclass
class _Group:
    name: str
    kind: str
    root: nn.Module
    units: int
    unit_channels: int
    importance: torch.Tensor | None = None


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    fwd = (lambda m, x: m(**x)) if isinstance(example_inputs, dict) else None
    with torch.enable_grad():  # DepGraph traces autograd: works also when the caller is under torch.no_grad()
        return tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=fwd,
                                                     customized_pruners=CUSTOM_PRUNERS, verbose=False)


def _attention_modules(model: nn.Module):
    """(name, self-attention module, query Linear, heads attribute, head size) of BERT- and DistilBERT-style
    encoders."""
    for name, m in model.named_modules():
        if all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads")):
            yield name, m, m.query, "num_attention_heads", m.attention_head_size
        elif all(hasattr(m, a) for a in ("q_lin", "k_lin", "v_lin", "n_heads")):
            yield name, m, m.q_lin, "n_heads", m.attention_head_size


def _ffn_inputs(model: nn.Module):
    for name, m in model.named_modules():
        if name.endswith("intermediate.dense") or name.endswith("ffn.lin1"):
            yield name, m


def is_transformer(model: nn.Module) -> bool:
    return any(True for _ in _attention_modules(model))


def find_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[_Group]:
    names = {m: n for n, m in model.named_modules()}
    groups: list[_Group] = []
    if is_transformer(model):
        for name, attn, query, heads_attr, head_dim in _attention_modules(model):
            heads = getattr(attn, heads_attr)
            groups.append(_Group(name, "heads", query, heads, head_dim))
        for name, lin in _ffn_inputs(model):
            groups.append(_Group(name, "ffn", lin, lin.out_features, 1))
        return groups
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    for g in graph.get_all_groups(ignored_layers=classifier, root_module_types=(nn.Conv2d, nn.Linear)):
        root = g[0].dep.target.module
        n = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        groups.append(_Group(names[root], "channels", root, n, 1))
    return groups


def _handler(root: nn.Module):
    return tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels


def _channel_idxs(group: _Group | GroupDecision, units: list[int]) -> list[int]:
    c = group.unit_channels
    return [u * c + j for u in units for j in range(c)]


def _prune_one(model: nn.Module, graph: tp.DependencyGraph, g: _Group, removed_units: list[int]) -> None:
    if not removed_units:
        return
    graph.get_pruning_group(g.root, _handler(g.root), _channel_idxs(g, removed_units)).prune()
    if g.kind == "heads":
        attn = model.get_submodule(g.name)
        kept = g.root.out_features // g.unit_channels
        if hasattr(attn, "num_attention_heads"):
            attn.num_attention_heads = kept
            attn.all_head_size = kept * g.unit_channels
        else:
            attn.n_heads = kept


def score_groups(model: nn.Module, graph: tp.DependencyGraph, groups: list[_Group], criterion: str) -> None:
    """Fill each group's per-unit importance (gradients must already be accumulated for `taylor`)."""
    imp = channel_criterion(criterion)
    for g in groups:
        n_ch = g.units * g.unit_channels
        pg = graph.get_pruning_group(g.root, _handler(g.root), list(range(n_ch)))
        scores = imp(pg)
        if scores is None:  # no parameter in the group the criterion can read
            scores = torch.ones(n_ch)
        g.importance = scores.detach().float().view(g.units, g.unit_channels).sum(1)


def candidates(units: int, unit_channels: int, ratio: float, multiple: int) -> list[int]:
    """Kept-unit counts around `units * (1 - ratio)` whose channel count is a multiple of `multiple`."""
    step = max(1, multiple // math.gcd(multiple, unit_channels)) if unit_channels % multiple else 1
    if units <= step:
        return [units]
    target = units * (1 - ratio)
    low = max(step, int(math.floor(target / step)) * step)
    high = min(units, int(math.ceil(target / step)) * step)
    return sorted({low, high})


class CostModel:
    """Share of the model's parameters and MACs that stays when each group keeps a fraction of its units.

    Exact for convolutions, linear layers and norms, not a sum of per-group estimates: a weight whose input and
    output channels are both pruned is removed once, so a layer's cost scales with the product of the kept
    fractions of the group that owns its outputs and the group that owns its inputs.
    """

    def __init__(self, model: nn.Module, graph: tp.DependencyGraph, groups: list[_Group], example_inputs: Any):
        self.params = float(sum(p.numel() for p in model.parameters()))
        self.macs = _layer_macs(model, example_inputs)
        self.base_macs = float(sum(self.macs.values())) or 1.0
        self.owner_out: dict[nn.Module, str] = {}
        self.owner_in: dict[nn.Module, str] = {}
        for g in groups:
            pg = graph.get_pruning_group(g.root, _handler(g.root), list(range(g.units * g.unit_channels)))
            for dep, _ in pg:
                m = dep.target.module
                if not isinstance(m, nn.Module):
                    continue
                side = self.owner_out if dep.handler.__name__ == "prune_out_channels" else self.owner_in
                side.setdefault(m, g.name)
        self.modules = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]

    def kept_share(self, fractions: dict[str, float]) -> float:
        """Mean of the parameter share and the MAC share kept (1.0: nothing pruned)."""
        params = macs = 0.0
        for m in self.modules:
            f_out = fractions.get(self.owner_out.get(m, ""), 1.0)
            f_in = 1.0 if _depthwise(m) else fractions.get(self.owner_in.get(m, ""), 1.0)
            for p in m.parameters(recurse=False):
                params += p.numel() * f_out * (f_in if p.dim() > 1 else 1.0)
            macs += self.macs.get(m, 0.0) * f_out * f_in
        return 0.5 * (params / self.params + macs / self.base_macs)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _layer_macs(model: nn.Module, example_inputs: Any) -> dict[nn.Module, float]:
    macs: dict[nn.Module, float] = {}

    def hook(m, _inputs, out):
        per_output = m.weight[0].numel()  # (in / groups) * kernel for a conv, in_features for a linear layer
        macs[m] = macs.get(m, 0.0) + float(out.numel()) * per_output

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with evaluating(model), forward_hooks(layers, hook), torch.no_grad():
        forward(model, example_inputs)
    return macs


def allocate(groups: list[_Group], sensitivity: dict[str, float], kept_share: Callable[[dict[str, float]], float],
             ratio: float, multiple: int) -> dict[str, int]:
    """Choose each group's kept units: remove at least what pruning every group by exactly `ratio` would remove
    (in `kept_share`'s measure of parameters and MACs), at the least estimated loss. A group the target's widths
    cannot shrink (fewer units than one multiple to spare: 16 channels at a multiple of 16) is left out of that
    budget, rather than its share being cut from the other groups.

    A group's estimated loss for keeping k units is its measured sensitivity (at the lower candidate) scaled by the
    share of importance that k removes relative to the lower candidate. Greedy over the candidates: each step takes
    the cut with the least loss per unit of cost removed until the budget is reached; then cuts that the budget no
    longer needs are given back, so the model is pruned no further than the ratio asks (up to one rounding step).
    """
    choice, options = {}, {}
    for g in groups:
        cands = candidates(g.units, g.unit_channels, ratio, multiple)
        order = torch.sort(g.importance).values
        ref = float(order[: g.units - cands[0]].sum()) or 1e-12
        s = max(sensitivity.get(g.name, 0.0), 1e-9)
        options[g.name] = {k: s * float(order[: g.units - k].sum()) / ref for k in cands}
        choice[g.name] = cands[-1]
    units = {g.name: g.units for g in groups}

    def share(kept: dict[str, int]) -> float:
        return kept_share({n: k / units[n] for n, k in kept.items()})

    fixed = {g.name for g in groups if len(options[g.name]) == 1 and choice[g.name] == g.units}
    target = kept_share({g.name: 1.0 if g.name in fixed else 1 - ratio for g in groups})
    current = share(choice)
    while current > target + 1e-12:
        best = None
        for g in groups:
            lower = [k for k in options[g.name] if k < choice[g.name]]
            if not lower:
                continue
            k = max(lower)
            after = share({**choice, g.name: k})
            gain = current - after
            if gain <= 0:
                continue
            rate = (options[g.name][k] - options[g.name][choice[g.name]]) / gain
            if best is None or rate < best[0]:
                best = (rate, g.name, k, after)
        if best is None:
            break
        _, name, k, current = best
        choice[name] = k
    # A later, larger cut can make an earlier one unnecessary: give back cuts, costliest in loss first, while the
    # budget still holds.
    for g in sorted(groups, key=lambda g: options[g.name][choice[g.name]], reverse=True):
        higher = [k for k in options[g.name] if k > choice[g.name]]
        if higher and share({**choice, g.name: min(higher)}) <= target + 1e-12:
            choice[g.name] = min(higher)
    return choice


def plan_pruning(model: nn.Module, example_inputs: Any, calib: list, ratio: float, multiple: int,
                 criterion: str) -> list[GroupDecision]:
    """Score, measure and allocate; return the decisions without touching `model`."""
    from hpqdeploy.core.importance import accumulate_gradients

    graph = build_graph(model, example_inputs)
    groups = find_groups(model, graph)
    if criterion == "taylor":
        accumulate_gradients(model, calib)
    score_groups(model, graph, groups, criterion)
    model.zero_grad(set_to_none=True)
    reference = reference_outputs(model, calib)
    sensitivity = {}
    for i, g in enumerate(groups):
        low = candidates(g.units, g.unit_channels, ratio, multiple)[0]
        if low == g.units:
            sensitivity[g.name] = 0.0
            continue
        trial = copy.deepcopy(model)
        trial_graph = build_graph(trial, example_inputs)
        _prune_one(trial, trial_graph, find_groups(trial, trial_graph)[i],
                   torch.argsort(g.importance)[: g.units - low].tolist())
        sensitivity[g.name] = output_divergence(trial, calib, reference)
    cost = CostModel(model, graph, groups, example_inputs)
    kept = allocate(groups, sensitivity, cost.kept_share, ratio, multiple)
    return [GroupDecision(g.name, g.kind, g.units, kept[g.name], g.unit_channels, round(sensitivity[g.name], 6),
                          sorted(torch.argsort(g.importance)[: g.units - kept[g.name]].tolist()))
            for g in groups]


def apply_pruning(model: nn.Module, example_inputs: Any, decisions: list[GroupDecision]) -> nn.Module:
    """Physically remove the recorded units (also how a saved artifact's architecture is rebuilt)."""
    graph = build_graph(model, example_inputs)
    groups = {g.name: g for g in find_groups(model, graph)}
    for d in decisions:
        if d.name not in groups:
            raise ValueError(f"plan names pruning group {d.name!r}, which this model does not have")
        _prune_one(model, graph, groups[d.name], d.removed)
    return model


def removed_outputs(model: nn.Module, example_inputs: Any,
                    decisions: list[GroupDecision]) -> dict[nn.Module, list[int]]:
    """Every module of the unpruned `model` whose outputs the decisions remove, with those output indices."""
    graph = build_graph(model, example_inputs)
    groups = {g.name: g for g in find_groups(model, graph)}
    modules = set(model.modules())
    removed: dict[nn.Module, set[int]] = {}
    for d in decisions:
        if not d.removed:
            continue
        g = groups[d.name]
        for item in graph.get_pruning_group(g.root, _handler(g.root), _channel_idxs(d, d.removed)).items:
            module = item.dep.target.module
            if module in modules and graph.is_out_channel_pruning_fn(item.dep.handler):
                removed.setdefault(module, set()).update(int(i) for i in item.idxs)
    return {m: sorted(idxs) for m, idxs in removed.items()}


class FadeOut:
    """Gradual pruning: scale the outputs of the channels a plan removes by a factor falling from 1 to 0.

    Fading the channels out while training lets the kept channels take over their work instead of recovering from
    a one-shot cut (the gradual schedule of Zhu & Gupta, 2017, and NNCF's filter pruning, at channel
    granularity). Measured on ResNet-20 with 6 epochs it did worse than one-shot removal (the fading epochs train
    the full model, not the pruned one), so `compress` uses it only when asked. Every module that writes a removed
    channel (a DepGraph group's out-channel layers: convolutions, their BatchNorms, shortcuts, the query, key and
    value projections of a head, an FFN's first layer) has its output multiplied by the factor, so the channel
    carries `factor` times its value everywhere; at factor 0 removing it with `apply_pruning` changes nothing.
    The scaling applies inside `with gates.attached():`; the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, decisions: list[GroupDecision]):
        self.factor = 1.0
        removed = removed_outputs(model, example_inputs, decisions)
        self._channels = {m: torch.tensor(idxs) for m, idxs in removed.items()}

    def _scale(self, module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        dim = -1 if isinstance(module, nn.Linear) else 1
        shape = [1] * output.dim()
        shape[dim] = output.shape[dim]
        gate = torch.ones(output.shape[dim], dtype=output.dtype)
        gate[self._channels[module]] = self.factor
        return output * gate.view(shape)

    def schedule(self, step: int, steps: int) -> None:
        """Cosine fall from 1 before the first step to 0 at the last one."""
        self.factor = 0.5 * (1 + math.cos(math.pi * min(step + 1, steps) / steps))

    def attached(self):
        """Context manager: the removed channels are scaled inside the block."""
        return forward_hooks(self._channels, self._scale)
