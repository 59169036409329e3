"""Quantization points between layers, where a runtime's integer kernels need a tensor quantized.

A runtime keeps a network in integer arithmetic only where every tensor between two quantized layers is quantized:
ONNX Runtime fuses `DQ -> Conv -> Q` into QLinearConv and `DQ, DQ -> Add -> Q` into QLinearAdd, OpenVINO runs a
residual block in int8 when both branches of its add pass a FakeQuantize, XNNPACK runs a quantized add. A layer's
input quantizer alone leaves each convolution's output (and so each residual add) in float. The runtimes' own
quantizers (ONNX Runtime's QDQ registry, NNCF's CPU hardware configuration, XNNPACK's quantizer annotators) all
quantize the inputs and output of residual adds, concatenations and average pooling; `targets/<runtime>.toml`
lists those ops as `quantized_ops`, and a test checks each list against the runtime's own tables.

`insert_points` rewrites a torch.fx-traceable model (CNNs; a transformer that fx cannot trace keeps its layer-input
quantizers only) with one `TensorQuant` per such tensor, shared by all its consumers:

- each tensor input of a quantized op, found by walking back through ops that keep a quantized tensor on its grid
  (slices, padding with zeros, index_select, reshapes, max pooling); where that walk passed such an op, a second
  point right before the quantized op is tied to the first (same range: exact in PyTorch, and the runtime finds
  its Q/DQ where it fuses);
- its output, after the ReLU that is its only consumer (ORT removes a ReLU before a Q whose zero point is 0);
- a quantized layer (conv, linear) whose input is such a tensor is tied to the point: it uses the point's range,
  so one tensor is quantized once, as the runtimes do it.

The points are recorded in `plan.json` by fx node name, and `artifact.load` re-inserts them from there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from hpqdeploy.core.quantize import TensorQuant, _QuantMixin
from hpqdeploy.core.targets import QUANTIZED_OP_KINDS as OP_KINDS

CONTAINER = "quant_points"

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.avg_pool2d)
_CAT_FUNCTIONS = (torch.cat, torch.concat)
# ops after which a tensor on a quantization grid is still on it (values selected, moved, or zeros added)
_KEEP_GRID_FUNCTIONS = (torch.flatten, torch.reshape, torch.index_select, operator.getitem, F.max_pool2d, F.pad)
_KEEP_GRID_METHODS = ("flatten", "reshape", "view", "index_select", "contiguous", "permute", "transpose", "squeeze",
                      "unsqueeze")
_KEEP_GRID_MODULES = (nn.Identity, nn.Flatten, nn.MaxPool2d)
_RELU = (F.relu, torch.relu, "relu", nn.ReLU)


class _Tracer(torch.fx.Tracer):
    """Quantized layers, points, and modules that declare `keeps_quantization_grid = True` (a model's own data
    movement, such as the CIFAR ResNets' channel-map shortcut, which lowerings rewrite whole) stay single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (_QuantMixin, TensorQuant)) or getattr(m, "keeps_quantization_grid", False)
                or super().is_leaf_module(m, qualname))


@dataclass
class Points:
    """Where the points went: node name -> its module; ties: quantized layer or point -> the point it reads."""

    model: nn.Module
    points: dict[str, TensorQuant] = field(default_factory=dict)
    mirrors: dict[str, str] = field(default_factory=dict)  # mirror point -> the point whose range it shares
    layer_ties: dict[str, str] = field(default_factory=dict)  # layer name -> point name
    ops: dict[str, int] = field(default_factory=dict)  # quantized op kind -> how many

    def to_json(self) -> dict:
        return {"ops": self.ops, "points": sorted(self.points), "mirrors": self.mirrors,
                "layer_ties": self.layer_ties}


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """The model as an fx graph (quantized layers as single nodes), or None where fx cannot trace it."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # fx fails in many ways on data-dependent control flow (transformers)
        return None
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def op_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """"add" | "avg_pool" | "cat" for the ops the runtimes quantize between layers, else None."""
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if node.op == "call_function":
        if node.target in _ADD_FUNCTIONS and len(tensors) == 2:
            return "add"
        if node.target in _POOL_FUNCTIONS:
            return "avg_pool"
        if node.target in _CAT_FUNCTIONS:
            return "cat"
    if node.op == "call_method" and node.target in ("add", "add_", "__add__") and len(tensors) == 2:
        return "add"
    if isinstance(_module(gm, node), (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return "avg_pool"
    return None


def _keeps_grid(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _KEEP_GRID_FUNCTIONS:
        if node.target is F.pad and (node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0) or 0) != 0:
            return False  # padding with anything but zero adds values off the grid
        return True
    if node.op == "call_method" and node.target in _KEEP_GRID_METHODS:
        return True
    module = _module(gm, node)
    return isinstance(module, _KEEP_GRID_MODULES) or getattr(module, "keeps_quantization_grid", False)


def _transparent(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Ops that are no op in an exported graph."""
    return isinstance(_module(gm, node), nn.Identity) or (node.op == "call_method" and node.target == "contiguous")


def walk_back(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
    """The node whose value `node` is on the grid of, and whether everything between them is transparent."""
    direct = True
    while _keeps_grid(gm, node):
        direct = direct and _transparent(gm, node)
        node = node.args[0]
    return node, direct


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op in ("call_function", "call_method") and node.target in _RELU:
        return True
    return isinstance(_module(gm, node), nn.ReLU)


def find(gm: torch.fx.GraphModule, ops: tuple[str, ...]) -> tuple[list[torch.fx.Node], list[tuple], dict[str, int]]:
    """Point nodes (each tensor quantized once), mirrors (edge into a quantized op -> its source point node), and
    the count of quantized ops by kind."""
    points: dict[str, torch.fx.Node] = {}
    mirrors: list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]] = []  # (value node, consumer, source point)
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        kind = op_kind(gm, node)
        if kind is None or kind not in ops:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        inputs = node.args[0] if kind == "cat" else node.args
        for arg in inputs:
            if not isinstance(arg, torch.fx.Node) or arg.op == "get_attr":
                continue
            src, direct = walk_back(gm, arg)
            if src.op == "placeholder":  # the model's input: a layer's own input quantizer covers it
                continue
            points.setdefault(src.name, src)
            if not direct:
                mirrors.append((arg, node, src))
        out = node
        users = list(out.users)
        if len(users) == 1 and _is_relu(gm, users[0]):
            out = users[0]
        if any(u.op != "output" for u in out.users):  # not the model's output (logits stay float)
            points.setdefault(out.name, out)
    return list(points.values()), mirrors, counts


def insert_points(model: nn.Module, ops: tuple[str, ...] = OP_KINDS, act_bits: int = 8) -> Points | None:
    """Insert the points into a copy of `model`'s graph (a GraphModule with the same parameter names, plus
    `quant_points.<node>` buffers); None where fx cannot trace the model or there is nothing to quantize."""
    gm = trace(model)
    if gm is None:
        return None
    nodes, mirror_edges, counts = find(gm, ops)
    if not nodes:
        return None
    container = nn.Module()
    gm.add_module(CONTAINER, container)
    result = Points(gm, ops=counts)
    by_node: dict[str, torch.fx.Node] = {}
    for node in nodes:
        tq = TensorQuant(act_bits)
        container.add_module(node.name, tq)
        result.points[node.name] = tq
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(f"{CONTAINER}.{node.name}", (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        by_node[node.name] = q
    for value, consumer, src in mirror_edges:
        name = f"{value.name}__to__{consumer.name}"
        tq = TensorQuant(act_bits)
        tq.tie_to(result.points[src.name])
        container.add_module(name, tq)
        result.points[name] = tq
        result.mirrors[name] = src.name
        with gm.graph.inserting_before(consumer):
            q = gm.graph.call_module(f"{CONTAINER}.{name}", (value,))
        consumer.replace_input_with(value, q)
    for node in gm.graph.nodes:  # layers reading a point: tied to it
        layer = _module(gm, node)
        if not isinstance(layer, _QuantMixin) or not int(layer.act_bits) or layer.act_dynamic or not node.args:
            continue
        src, direct = walk_back(gm, node.args[0])
        point = str(src.target).removeprefix(f"{CONTAINER}.") if src.op == "call_module" else None
        if point in result.points:
            layer.tie_to(result.points[point], direct=direct)
            result.layer_ties[node.target] = point
    gm.graph.lint()
    gm.recompile()
    return result


def restore(model: nn.Module, recorded: dict, act_bits: int = 8) -> nn.Module:
    """Re-insert the points `plan.json` recorded (the same model, pruned and quantized as recorded, traces to the
    same graph); a mismatch is an error, never a silently different model."""
    result = insert_points(model, tuple(recorded.get("ops") or OP_KINDS), act_bits)
    found = sorted(result.points) if result else []
    if found != sorted(recorded.get("points", [])):
        missing = sorted(set(recorded.get("points", [])) - set(found)) or sorted(set(found) - set(recorded["points"]))
        raise ValueError(f"the model's quantization points do not match the plan (first difference: {missing[0]})")
    return result.model


def reset_ties(model: nn.Module) -> None:
    """Re-read every tie's range (after a state dict was loaded into the points)."""
    for m in model.modules():
        if isinstance(m, (_QuantMixin, TensorQuant)) and m.act_source is not None:
            m.act_range.copy_(m.act_source.act_range)
