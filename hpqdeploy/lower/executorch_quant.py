"""The plan, re-expressed in the quantization flows ExecuTorch's XNNPACK delegate understands.

A legalized fake-quant model becomes a float model plus two quantization recipes:

- 8-bit layers with static activations: the float twin's weight is pre-clipped to the plan's range (+-127 steps),
  so the PT2E `XNNPACKQuantizer`'s symmetric per-channel min/max weight observer reproduces the plan's scale and
  integer weights exactly. The observer at each such layer's input is replaced by a min/max observer holding the
  plan's `act_range` (the plan's activation scale and zero point), unless XNNPACK shares that observer with a tensor
  of another value (a pooling op's input, say); those, and the quantization points XNNPACK adds where the plan has
  none (layer outputs, residual adds), are calibrated on the calibration split.
- layers with dynamic activations (4-bit linear weights here, and every part of a split layer that had them): torchao
  `Int8DynamicActivationIntxWeightConfig` (int8 per-token activations, intx weights per group or per channel), whose
  integer weights and scales are then overwritten with the plan's (torchao's own symmetric mapping divides by 7.5
  steps at 4 bits, the plan by 7).
- layers with float activations run float, holding the plan's dequantized weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from hpqdeploy.errors import UserError
from hpqdeploy.lower.legalize import SplitEmbedding, SplitLinear
from hpqdeploy.lower.torch_prep import QuantParams, fold_batchnorm, quant_params
from hpqdeploy.models.cifar_resnet import ChannelMapShortcut
from hpqdeploy.quantize import _QuantMixin, quantize_weight

STATIC, DYNAMIC, FLOAT = "static int8", "dynamic int8 activations", "float"
_WEIGHT_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_FUSED_ACTIVATIONS = (torch.ops.aten.relu.default, torch.ops.aten.hardtanh.default)


@dataclass
class LayerPlan:
    role: str  # STATIC | DYNAMIC | FLOAT
    params: QuantParams
    act_range: tuple[float, float]


def _role(name: str, m: _QuantMixin, p: QuantParams) -> str:
    if not p.act_bits:
        return FLOAT
    if p.act_dynamic:
        if not isinstance(m, nn.Linear):
            raise UserError(f"{name}: ExecuTorch runs dynamic activations for linear layers only; legalize this "
                            f"{type(m).__name__} with static activations")
        return DYNAMIC
    if p.bits != 8 or p.act_bits != 8 or p.group_size:
        raise UserError(f"{name}: XNNPACK runs static activations with 8-bit per-channel weights only, the plan has "
                        f"{p.bits}-bit weights ({'per-group' if p.group_size else 'per-channel'}), {p.act_bits}-bit "
                        "activations; export legalizes this, so the model was edited after legalization")
    return STATIC


@torch.no_grad()
def _float_layer(m: _QuantMixin, role: str, p: QuantParams) -> nn.Module:
    """The float module the runtime's quantizer starts from (see the module docstring for the weights it holds)."""
    w = m.weight.detach()
    if role == FLOAT:
        w = quantize_weight(w, m.w_bits, m.w_clip, m.group_size)
    else:  # clipped to the plan's largest level, so a min/max observer finds the plan's scale
        step = p.scales.repeat_interleave(p.group_size or w[0].numel(), dim=1).view_as(w)
        top = step * (2 ** (p.bits - 1) - 1)
        w = torch.clamp(w, -top, top)
    if isinstance(m, nn.Conv2d):
        twin: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                    m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    elif isinstance(m, nn.Linear):
        twin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        twin = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx)
    twin.weight = nn.Parameter(w.clone(), requires_grad=False)
    if getattr(m, "bias", None) is not None:
        twin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return twin.eval()


@torch.no_grad()
def _merge_float_embedding(split: SplitEmbedding) -> nn.Embedding:
    """All parts float: one table with every token's dequantized row in place reproduces the split exactly."""
    parts = [quantize_weight(p.weight, p.w_bits, p.w_clip, p.group_size) for p in split.parts]
    table = torch.stack([parts[int(i)][int(r)] for i, r in zip(split.table, split.row)])
    emb = nn.Embedding(*table.shape)
    emb.weight = nn.Parameter(table, requires_grad=False)
    return emb


@torch.no_grad()
def _selection_conv(shortcut: ChannelMapShortcut) -> nn.Conv2d:
    """`x[:, source, ::s, ::s]` (zero where source < 0) as a strided 1x1 convolution with one-hot weights: exact,
    and XNNPACK runs it, where the strided slice, pad and index_select of the original would stay outside."""
    conv = nn.Conv2d(shortcut.in_channels, shortcut.out_channels, 1, shortcut.stride, bias=False)
    w = torch.zeros(shortcut.out_channels, shortcut.in_channels, 1, 1)
    kept = torch.nonzero(shortcut.source >= 0).flatten()
    w[kept, shortcut.source[kept], 0, 0] = 1.0
    conv.weight = nn.Parameter(w, requires_grad=False)
    return conv


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def float_twin(model: nn.Module) -> tuple[nn.Module, dict[str, LayerPlan], list[str]]:
    """A float copy of `model` (BN folded) and, per quantized layer of the copy, how XNNPACK is to run it."""
    twin = copy.deepcopy(model).eval()
    notes = []
    folded = fold_batchnorm(twin)
    if folded:
        notes.append(f"{folded} BatchNorm layers folded into the preceding convolutions (plan's integer weights kept)")
    plans: dict[str, LayerPlan] = {}
    rewritten = 0
    for name, m in list(twin.named_modules()):
        if isinstance(m, SplitEmbedding) and all(not int(p.act_bits) for p in m.parts):
            _replace(twin, name, _merge_float_embedding(m))
        elif isinstance(m, ChannelMapShortcut):
            _replace(twin, name, _selection_conv(m))
            rewritten += 1
    if rewritten:
        notes.append(f"{rewritten} channel-map shortcuts (strided slice + pad + index_select) rewritten as exact "
                     "one-hot 1x1 strided float convolutions, so XNNPACK runs them")
    for name, m in list(twin.named_modules()):
        if isinstance(m, _QuantMixin):
            p = quant_params(m)
            role = _role(name, m, p)
            plans[name] = LayerPlan(role, p, (float(m.act_range[0]), float(m.act_range[1])))
            _replace(twin, name, _float_layer(m, role, p))
    return twin, plans, notes


def apply_dynamic(model: nn.Module, plans: dict[str, LayerPlan]) -> int:
    """torchao's int8-dynamic-activation / intx-weight linear for every DYNAMIC layer, holding the plan's numbers."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_

    groups: dict[tuple[int, int | None], set[str]] = {}
    for name, lp in plans.items():
        if lp.role == DYNAMIC:
            groups.setdefault((lp.params.bits, lp.params.group_size), set()).add(name)
    for (bits, group), names in groups.items():
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                                       weight_granularity=PerGroup(group) if group else PerAxis(0))
        quantize_(model, config, filter_fn=lambda _m, fqn, names=names: fqn in names)
        for name in names:
            weight, p = model.get_submodule(name).weight, plans[name].params
            if weight.scale.shape != p.scales.shape:
                raise RuntimeError(f"{name}: torchao scale shape {tuple(weight.scale.shape)} != plan's "
                                   f"{tuple(p.scales.shape)}")
            weight.qdata.copy_(p.int_weight)
            weight.scale.copy_(p.scales.to(weight.scale.dtype))
            weight.zero_point.zero_()
    return sum(len(n) for n in groups.values())


def _weight_owner(node: torch.fx.Node) -> str | None:
    """The module whose float weight a conv/linear node reads (None if it reads anything else, e.g. torchao's
    dequantized weight)."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.op == "call_module":  # a weight observer, once prepared
        w = w.args[0]
    if isinstance(w, torch.fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
        return str(w.target)[: -len(".weight")]
    return None


def static_quantizer(static: set[str], modality: str):
    """XNNPACKQuantizer, static int8 with symmetric per-channel weights, annotating only the plan's static layers
    among weighted ops. Image models also quantize the ops between them (adds, pools: XNNPACK's int8 CNN); text
    models keep those float (LayerNorm, softmax and the residual adds they read stay float, as in the plan)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    def annotate(node: torch.fx.Node) -> bool:
        if node.target in _WEIGHT_OPS:
            return _weight_owner(node) in static
        return modality == "image" or node.target in _FUSED_ACTIVATIONS

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return quantizer.set_filter_function(annotate)


def _is_observer(module: nn.Module) -> bool:
    return hasattr(module, "calculate_qparams") and hasattr(module, "min_val")


@torch.no_grad()
def keep_plan_activation_ranges(prepared: torch.fx.GraphModule, plans: dict[str, LayerPlan]) -> tuple[int, list[str]]:
    """Replace the calibrated observer at each static layer's input with a min/max observer holding the plan's
    `act_range`. Returns how many layers kept the plan's range, and the layers whose observer XNNPACK shares with
    another tensor (left calibrated: forcing the plan's range there would clip that other tensor)."""
    from torchao.quantization.pt2e.observer import MinMaxObserver

    modules = dict(prepared.named_modules(remove_duplicate=False))  # one observer may have several names
    observed_by: dict[int, set] = {}  # observer instance -> the nodes it observes
    for node in prepared.graph.nodes:
        if node.op == "call_module" and _is_observer(modules[node.target]):
            observed_by.setdefault(id(modules[node.target]), set()).add(node.args[0])
    ranges: dict[int, tuple[nn.Module, float, float]] = {}
    shared = []
    static_layers = 0
    for node in prepared.graph.nodes:
        owner = _weight_owner(node) if node.target in _WEIGHT_OPS else None
        if owner not in plans or plans[owner].role != STATIC:
            continue
        obs_node = node.args[0]
        obs = modules.get(obs_node.target) if obs_node.op == "call_module" else None
        if obs is None or not _is_observer(obs) or len(observed_by[id(obs)]) != 1:
            shared.append(owner)
            continue
        lo, hi = plans[owner].act_range
        if id(obs) in ranges:  # several layers read one tensor: their plan ranges come from it; take the union
            _, lo0, hi0 = ranges[id(obs)]
            lo, hi = min(lo, lo0), max(hi, hi0)
        ranges[id(obs)] = (obs, lo, hi)
        static_layers += 1
    for key, (obs, lo, hi) in ranges.items():
        fixed = MinMaxObserver(dtype=obs.dtype, quant_min=obs.quant_min, quant_max=obs.quant_max,
                               qscheme=obs.qscheme, eps=float(obs.eps))
        fixed(torch.tensor([lo, hi]))
        for name, module in modules.items():
            if id(module) == key:
                _replace(prepared, name, fixed)
    return static_layers, shared
