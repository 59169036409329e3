"""Structured pruning: importance-driven allocation of kept channels, executed by torch-pruning's DepGraph.

Every coupled set of channels (a DepGraph group: a conv's filters with the BN, the next layers' inputs and the
residual stream they join) is one allocation unit; transformer attention is pruned by whole heads and the FFN by
neurons. Each group keeps a multiple of the target's preferred channel count: of the two multiples around
`units * (1 - ratio)`, the allocation picks per group so that the parameters removed overall reach the ratio while
the estimated output divergence is smallest. The ratio each group really got is recorded in the plan.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from hpqdeploy.importance import channel_criterion, output_divergence, reference_outputs
from hpqdeploy.metrics import count_macs, count_params
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
    params_per_unit: float
    importance: torch.Tensor | None = None


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    fwd = (lambda m, x: m(**x)) if isinstance(example_inputs, dict) else None
    with torch.enable_grad():  # DepGraph traces autograd: works also when the caller is under torch.no_grad()
        return tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=fwd,
                                                     customized_pruners=CUSTOM_PRUNERS, verbose=False)


def _attention_modules(model: nn.Module):
    """(name, self-attention module, query Linear, heads attribute, head size) for BERT- and DistilBERT-style encoders."""
    for name, m in model.named_modules():
        if all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads")):
            yield name, m, m.query, "num_attention_heads", m.attention_head_size
        elif all(hasattr(m, a) for a in ("q_lin", "k_lin", "v_lin", "n_heads")):
            yield name, m, m.q_lin, "n_heads", m.attention_head_size


def _ffn_inputs(model: nn.Module):
    for name, m in model.named_modules():
        if name.endswith("intermediate.dense") or name.endswith("ffn.lin1"):
            yield name, m


def _is_transformer(model: nn.Module) -> bool:
    return any(True for _ in _attention_modules(model))


def _params_per_channel(group: tp.Group) -> float:
    total = 0.0
    for dep, _ in group:
        m = dep.target.module
        w = getattr(m, "weight", None)
        if not isinstance(m, nn.Module) or w is None or w.dim() == 0:
            continue
        if dep.handler.__name__ == "prune_out_channels":
            total += sum(p.numel() / p.shape[0] for p in m.parameters(recurse=False))
        elif w.dim() > 1:
            total += w.numel() / w.shape[1]
    return total


def find_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[_Group]:
    names = {m: n for n, m in model.named_modules()}
    groups: list[_Group] = []
    if _is_transformer(model):
        for name, attn, query, heads_attr, head_dim in _attention_modules(model):
            heads = getattr(attn, heads_attr)
            g = graph.get_pruning_group(query, tp.prune_linear_out_channels, list(range(query.out_features)))
            groups.append(_Group(name, "heads", query, heads, head_dim, _params_per_channel(g) * head_dim))
        for name, lin in _ffn_inputs(model):
            g = graph.get_pruning_group(lin, tp.prune_linear_out_channels, list(range(lin.out_features)))
            groups.append(_Group(name, "ffn", lin, lin.out_features, 1, _params_per_channel(g)))
        return groups
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    for g in graph.get_all_groups(ignored_layers=classifier, root_module_types=(nn.Conv2d, nn.Linear)):
        root = g[0].dep.target.module
        n = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        groups.append(_Group(names[root], "channels", root, n, 1, _params_per_channel(g)))
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


def allocate(groups: list[_Group], sensitivity: dict[str, float], cost_per_unit: dict[str, float], ratio: float,
             multiple: int) -> dict[str, int]:
    """Choose each group's kept units: remove what pruning every group by exactly `ratio` would remove, at the least
    estimated loss.

    `cost_per_unit` is a unit's share of the model's parameters plus its share of MACs (measured by pruning that
    group alone). A group's estimated loss for keeping k units is its measured sensitivity (at the lower candidate)
    scaled by the share of importance that k removes relative to the lower candidate. Greedy over the candidates.
    """
    choice, options = {}, {}
    for g in groups:
        cands = candidates(g.units, g.unit_channels, ratio, multiple)
        order = torch.sort(g.importance).values
        ref = float(order[: g.units - cands[0]].sum()) or 1e-12
        s = max(sensitivity.get(g.name, 0.0), 1e-9)
        options[g.name] = {k: s * float(order[: g.units - k].sum()) / ref for k in cands}
        choice[g.name] = cands[-1]
    need = sum(ratio * g.units * cost_per_unit[g.name] for g in groups)
    removed = sum((g.units - choice[g.name]) * cost_per_unit[g.name] for g in groups)
    while removed < need:
        best = None
        for g in groups:
            lower = [k for k in options[g.name] if k < choice[g.name]]
            if not lower or cost_per_unit[g.name] <= 0:
                continue
            k = max(lower)
            gain = (choice[g.name] - k) * cost_per_unit[g.name]
            rate = (options[g.name][k] - options[g.name][choice[g.name]]) / gain
            if best is None or rate < best[0]:
                best = (rate, g.name, k, gain)
        if best is None:
            break
        _, name, k, gain = best
        choice[name] = k
        removed += gain
    return choice


def plan_pruning(model: nn.Module, example_inputs: Any, calib: list, ratio: float, multiple: int,
                 criterion: str) -> list[GroupDecision]:
    """Score, measure and allocate; return the decisions without touching `model`."""
    from hpqdeploy.importance import accumulate_gradients

    graph = build_graph(model, example_inputs)
    groups = find_groups(model, graph)
    if criterion == "taylor":
        accumulate_gradients(model, calib)
    score_groups(model, graph, groups, criterion)
    model.zero_grad(set_to_none=True)
    reference = reference_outputs(model, calib)
    base_macs, base_params = count_macs(model, example_inputs), count_params(model)
    sensitivity, cost_per_unit = {}, {}
    for i, g in enumerate(groups):
        low = candidates(g.units, g.unit_channels, ratio, multiple)[0]
        if low == g.units:
            sensitivity[g.name], cost_per_unit[g.name] = 0.0, 0.0
            continue
        trial = copy.deepcopy(model)
        trial_graph = build_graph(trial, example_inputs)
        _prune_one(trial, trial_graph, find_groups(trial, trial_graph)[i],
                   torch.argsort(g.importance)[: g.units - low].tolist())
        sensitivity[g.name] = output_divergence(trial, calib, reference)
        macs, params = count_macs(trial, example_inputs), count_params(trial)
        cost_per_unit[g.name] = ((base_params - params) / base_params + (base_macs - macs) / base_macs) / (g.units - low)
    kept = allocate(groups, sensitivity, cost_per_unit, ratio, multiple)
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


