"""The plan, re-expressed in the quantization flows ExecuTorch's XNNPACK delegate understands.

A legalized fake-quant model becomes a float model plus the recipe for each quantized layer:

- 8-bit layers with static activations: the PT2E `XNNPACKQuantizer` (symmetric per-channel weights). The float
  twin's weight is pre-clipped to the plan's range (+-127 steps), and after calibration each layer's weight observer
  is set to the plan's scales, so the integer weights and scales XNNPACK stores are the plan's. The observer at each
  such layer's input is set to the plan's `act_range` (its activation scale and zero point), unless XNNPACK shares it
  with a tensor of another value (a pooling op's input, say); those, and the quantization points XNNPACK adds where
  the plan has none (layer outputs, residual adds), are calibrated on the calibration split.
- layers with dynamic activations (4-bit linear weights here, and every part of a split layer that had them): torchao
  `Int8DynamicActivationIntxWeightConfig` (int8 per-token activations, intx weights per group or per channel), whose
  integer weights and scales are then overwritten with the plan's (torchao's own symmetric mapping divides by 7.5
  steps at 4 bits, the plan by 7).
- embeddings (weights only, read outside XNNPACK): torchao `IntxWeightOnlyConfig` with the plan's integers and scales,
  fused by ExecuTorch into its quantized embedding kernels (`quantized_decomposed::embedding_byte` / `_4bit`).
- other layers with float activations run float, holding the plan's dequantized weights (XNNPACK computes
  weight-only intx linear layers wrongly, see RUNTIME-NOTES).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from hpqdeploy.core.qparams import QuantParams, qmax, quant_params, quantize_weight, weight_bound
from hpqdeploy.core.quantize import TensorQuant, _QuantMixin
from hpqdeploy.errors import UserError
from hpqdeploy.hooks import forward, forward_hooks
from hpqdeploy.lower.torch_prep import fold_batchnorm
from hpqdeploy.models.cifar_resnet import ChannelMapShortcut

STATIC, DYNAMIC, WEIGHT_ONLY, FLOAT = "static int8", "dynamic int8 activations", "weight-only", "float"
_WEIGHT_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_FUSED_ACTIVATIONS = (torch.ops.aten.relu.default, torch.ops.aten.hardtanh.default)
# Smallest weight scale passed to XNNPACK (its quantizer clamps at 2^-12, which would coarsen the plan's scales of
# channels with small weights; below 2^-20 a channel is dead, and the int32 bias it implies could overflow).
_WEIGHT_EPS = 2.0**-20


@dataclass
class LayerPlan:
    role: str  # STATIC | DYNAMIC | WEIGHT_ONLY | FLOAT
    params: QuantParams
    act_range: tuple[float, float]


def _role(name: str, m: _QuantMixin, p: QuantParams) -> str:
    if isinstance(m, nn.Embedding):
        return WEIGHT_ONLY
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
    else:  # clipped to the plan's range, as the plan's quantizer clips it
        top = weight_bound(p)
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
def _selection_conv(shortcut: ChannelMapShortcut) -> nn.Conv2d:
    """`x[:, source, ::s, ::s]` (zero where source < 0) as a strided 1x1 convolution with one-hot weights: exact,
    and XNNPACK runs it, where the strided slice, pad and index_select of the original would stay outside."""
    conv = nn.Conv2d(shortcut.in_channels, shortcut.out_channels, 1, shortcut.stride, bias=False)
    w = torch.zeros(shortcut.out_channels, shortcut.in_channels, 1, 1)
    kept = torch.nonzero(shortcut.source >= 0).flatten()
    w[kept, shortcut.source[kept], 0, 0] = 1.0
    conv.weight = nn.Parameter(w, requires_grad=False)
    conv.selects_channels = True  # int8 where the model runs int8: one-hot weights are exact at any 8-bit scale
    return conv


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _output_layers(model: nn.Module, example_inputs) -> set[str]:
    """The quantized layers whose output is the model's output (the logits), found by one forward pass."""
    names = {m: name for name, m in model.named_modules() if isinstance(m, _QuantMixin)}
    outputs: dict[str, torch.Tensor] = {}
    with forward_hooks(names, lambda m, _i, out: outputs.__setitem__(names[m], out)), torch.no_grad():
        result = forward(model, example_inputs)
    return {name for name, out in outputs.items() if out.data_ptr() == result.data_ptr() and out.shape == result.shape}


def float_twin(model: nn.Module, example_inputs=None) -> tuple[nn.Module, dict[str, LayerPlan], list[str]]:
    """A float copy of `model` (BN folded) and, per quantized layer of the copy, how XNNPACK is to run it.

    A static int8 linear layer that produces the model's output runs with dynamic activations instead: XNNPACK's
    static int8 would quantize the logits themselves to 8 bits over a calibrated range (clipping confident logits,
    rounding near ties together); the dynamic kernel returns them in float32."""
    twin = copy.deepcopy(model).eval()
    notes = []
    folded = fold_batchnorm(twin)
    if folded:
        notes.append(f"{folded} BatchNorm layers folded into the preceding convolutions (plan's integer weights kept)")
    plans: dict[str, LayerPlan] = {}
    rewritten = points = 0
    for name, m in list(twin.named_modules()):
        if isinstance(m, TensorQuant):  # XNNPACKQuantizer places its own observers there (module docstring)
            _replace(twin, name, nn.Identity())
            points += 1
    if points:
        notes.append(f"{points} quantization points between layers (residual adds, pooling) left to "
                     "XNNPACKQuantizer, which quantizes the same tensors, calibrated on the calibration split")
    for name, m in list(twin.named_modules()):
        if isinstance(m, ChannelMapShortcut):
            _replace(twin, name, _selection_conv(m))
            rewritten += 1
    if rewritten:
        notes.append(f"{rewritten} channel-map shortcuts (strided slice + pad + index_select) rewritten as exact "
                     "one-hot 1x1 strided float convolutions, so XNNPACK runs them")
    output_layers = _output_layers(twin, example_inputs) if example_inputs is not None else set()
    for name, m in list(twin.named_modules()):
        if isinstance(m, _QuantMixin):
            p = quant_params(m)
            role = _role(name, m, p)
            if role == STATIC and name in output_layers and isinstance(m, nn.Linear):
                role = DYNAMIC
                notes.append(f"{name} produces the logits: it runs with dynamic int8 activations (float32 output) "
                             "instead of static int8, whose output would be the logits quantized to 8 bits")
            plans[name] = LayerPlan(role, p, (float(m.act_range[0]), float(m.act_range[1])))
            _replace(twin, name, _float_layer(m, role, p))
    return twin, plans, notes


def apply_torchao(model: nn.Module, plans: dict[str, LayerPlan]) -> None:
    """torchao's intx tensors for the DYNAMIC and WEIGHT_ONLY layers, then the plan's integers and scales in them."""
    from torchao.quantization import (Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup,
                                      quantize_)

    groups: dict[tuple[str, int, int | None], set[str]] = {}
    for name, lp in plans.items():
        if lp.role in (DYNAMIC, WEIGHT_ONLY):
            groups.setdefault((lp.role, lp.params.bits, lp.params.group_size), set()).add(name)
    for (role, bits, group), names in groups.items():
        dtype, granularity = getattr(torch, f"int{bits}"), PerGroup(group) if group else PerAxis(0)
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity) \
            if role == DYNAMIC else IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)
        for name in names:
            layer = model.get_submodule(name)
            if isinstance(layer, nn.Embedding):
                # padding_idx only shapes gradients, but an embedding op carrying it escapes ExecuTorch's quantized
                # embedding fusion and leaves torchao::dequantize_affine, which has no kernel
                layer.padding_idx = None
        quantize_(model, config, filter_fn=lambda _m, fqn, names=names: fqn in names)
        for name in names:
            weight, p = model.get_submodule(name).weight, plans[name].params
            if weight.scale.shape != p.scales.shape:
                raise RuntimeError(f"{name}: torchao scale shape {tuple(weight.scale.shape)} != plan's "
                                   f"{tuple(p.scales.shape)}")
            weight.qdata.copy_(p.int_weight)
            weight.scale.copy_(p.scales.to(weight.scale.dtype))
            weight.zero_point.zero_()


def _weight_owner(node: torch.fx.Node) -> str | None:
    """The module whose float weight a conv/linear node reads (None if it reads anything else, e.g. torchao's
    dequantized weight)."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.op == "call_module":  # a weight observer, once prepared
        w = w.args[0]
    if isinstance(w, torch.fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
        return str(w.target)[: -len(".weight")]
    return None


def selection_layers(model: nn.Module) -> set[str]:
    """The one-hot channel-selection convolutions `float_twin` put in place of channel-map shortcuts."""
    return {n for n, m in model.named_modules() if getattr(m, "selects_channels", False)}


def static_quantizer(static: set[str], modality: str):
    """XNNPACKQuantizer, static int8 with symmetric per-channel weights, annotating only the plan's static layers
    among weighted ops. Image models also quantize the ops between them (adds, pools: XNNPACK's int8 CNN); text
    models keep those float (LayerNorm, softmax and the residual adds they read stay float, as in the plan)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    class PlanQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model):
            return _float_scalars_to_attrs(model)

    def annotate(node: torch.fx.Node) -> bool:
        if node.target in _WEIGHT_OPS:
            return _weight_owner(node) in static
        return modality == "image" or node.target in _FUSED_ACTIVATIONS

    quantizer = PlanQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return quantizer.set_filter_function(annotate)


def _float_scalars_to_attrs(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """XNNPACKQuantizer's own transform (scalar operands of add/mul become tensor attributes, so they can be
    quantized), restricted to floating-point ops: it also turns integer index arithmetic (transformers' attention
    mask) into float, which then fails as an index."""
    from torchao.quantization.pt2e.utils import get_new_attr_name_with_prefix

    for node in list(model.graph.nodes):
        val = node.meta.get("val")
        if (node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)
                or not isinstance(val, torch.Tensor) or not val.is_floating_point()):
            continue
        args = []
        for arg in node.args:
            if not isinstance(arg, torch.fx.Node):
                name = get_new_attr_name_with_prefix("_tensor_constant_")(model)
                constant = torch.tensor(float(arg))
                model.register_buffer(name, constant)
                with model.graph.inserting_before(node):
                    arg_node = model.graph.create_node("get_attr", name, (), {})
                arg_node.meta["val"] = val.fake_mode.from_tensor(constant, static_shapes=True)
                arg = arg_node
            args.append(arg)
        node.args = tuple(args)
    model.recompile()
    return model


def _is_observer(module: nn.Module) -> bool:
    return hasattr(module, "calculate_qparams") and hasattr(module, "min_val")


@torch.no_grad()
def keep_plan_ranges(prepared: torch.fx.GraphModule, plans: dict[str, LayerPlan]) -> tuple[int, list[str]]:
    """Make the calibrated PT2E model quantize the plan's static layers with the plan's own scales.

    Weights: each layer's per-channel observer is replaced by one holding +-qmax * the plan's scale (pre-clipping
    alone does not do it where legalization raised 4-bit channels to 8 bits with a clip above 1, keeping their 4-bit
    values on a 4-bit-sized step). Activations: the observer at each layer's input is replaced by a min/max observer
    holding the plan's `act_range`, unless XNNPACK shares that observer with a tensor of another value (a pooling
    op's input, say): forcing the range there would clip that other tensor, so it stays calibrated.
    Returns how many layers kept the plan's activation range, and the layers left calibrated (shared observers, or
    a layer the plan never observed)."""
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

    modules = dict(prepared.named_modules(remove_duplicate=False))  # one observer may have several names
    observed_by: dict[int, set] = {}  # observer instance -> the nodes it observes
    for node in prepared.graph.nodes:
        if node.op == "call_module" and _is_observer(modules[node.target]):
            observed_by.setdefault(id(modules[node.target]), set()).add(node.args[0])
    replace: dict[int, nn.Module] = {}  # observer instance -> its replacement
    act_ranges: dict[int, tuple[float, float]] = {}
    shared, static_layers = [], 0
    for node in prepared.graph.nodes:
        owner = _weight_owner(node) if node.target in _WEIGHT_OPS else None
        if owner not in plans or plans[owner].role != STATIC:
            continue
        static_layers += 1
        p = plans[owner].params
        old = modules[node.args[1].target]
        top = p.scales.flatten() * qmax(p.bits)
        weight_obs = PerChannelMinMaxObserver(ch_axis=0, dtype=old.dtype, qscheme=old.qscheme,
                                              quant_min=old.quant_min, quant_max=old.quant_max, eps=_WEIGHT_EPS)
        weight_obs(torch.stack([-top, top], dim=1))
        replace[id(old)] = weight_obs
        act = modules.get(node.args[0].target) if node.args[0].op == "call_module" else None
        lo, hi = plans[owner].act_range
        if act is None or not _is_observer(act) or len(observed_by[id(act)]) != 1 or not lo <= hi < float("inf"):
            shared.append(owner)  # shared, or a range the plan never observed
            continue
        if id(act) in act_ranges:  # several layers read one tensor: their plan ranges come from it; take the union
            lo, hi = min(lo, act_ranges[id(act)][0]), max(hi, act_ranges[id(act)][1])
        act_ranges[id(act)] = (lo, hi)
        act_obs = MinMaxObserver(dtype=act.dtype, quant_min=act.quant_min, quant_max=act.quant_max,
                                 qscheme=act.qscheme, eps=float(act.eps))
        act_obs(torch.tensor([lo, hi]))
        replace[id(act)] = act_obs
    for name, module in modules.items():
        if id(module) in replace:
            _replace(prepared, name, replace[id(module)])
    return static_layers - len(shared), shared
