"""Make a compressed model executable by one runtime, and say exactly what that changed.

A precision the plan asks for but the target does not execute is raised to the nearest one it does (a 4-bit conv
becomes 8-bit on every runtime here); a granularity it does not run is changed (per-channel 4-bit becomes per-group
where the runtime needs groups); activations feeding low-bit weights run the way the runtime runs them (float for
weight-only kernels, per-batch int8 for XNNPACK). A layer whose output channels still mix bit widths is either
raised to one width (`mixed="layer"`) or split into one part per width (`mixed="split"`): the output channels are
permuted so each width is contiguous, each part is its own layer, and an index gather restores the order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from hpqdeploy.core.qparams import qmax, quant_params, quantize_weight
from hpqdeploy.core.quantize import QEmbedding, QLinear, _QuantMixin, op_kind
from hpqdeploy.core.targets import Target

MIXED_MODES = ("split", "layer")
OVERFLOW_FIX = ("auto", "on", "off")
NARROW_QMAX = 63  # 7-bit weights: 255 x 63 x 2 = 32,130 fits int16, so a pair of u8 x i8 products cannot saturate


@dataclass
class Change:
    layer: str
    what: str
    before: str
    after: str
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def _raise_bits(b: int, allowed: tuple[int, ...]) -> int:
    higher = [a for a in allowed if a >= b]
    return min(higher) if higher else max(allowed)


@torch.no_grad()
def _pin_values(m: _QuantMixin, rows: torch.Tensor, clip: float) -> None:
    """Replace the float weights of `rows` by the quantized values the model computes, and give those rows `clip`.
    Every non-zero channel of a symmetric quantizer has a value on its top level, so the rows' new step is
    `clip * old step * qmax / qmax`: clip qmax(new) / qmax(old) keeps the step across a change of bit width."""
    values = quantize_weight(m.weight, m.w_bits, m.w_clip, m.group_size)
    m.weight[rows] = values[rows]
    m.w_clip[rows] = clip


def _keep_values(m: _QuantMixin, rows: torch.Tensor, old: int, new: int) -> None:
    """Raise `rows` to `new` bits without re-quantizing the float weights: the raised layer computes exactly what
    the compressed model computed (the `old`-bit values, same step), now on the runtime's wider grid."""
    _pin_values(m, rows, float(qmax(new) / qmax(old)))


def legalize(model: nn.Module, target: Target, mixed: str = "split") -> list[Change]:
    """Edit the fake-quant `model` in place so that every quantized layer is executable by `target`."""
    changes: list[Change] = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, _QuantMixin):
            continue
        kind = op_kind(m)
        s = target.support(kind)
        for b in sorted(set(m.w_bits.tolist())):
            if b not in s.weight_bits:
                new = _raise_bits(b, s.weight_bits)
                rows = m.w_bits == b
                if new > b:
                    _keep_values(m, rows, b, new)
                m.w_bits[rows] = new
                changes.append(Change(name, "weight bits", f"{b}-bit x{int(rows.sum())} channels", f"{new}-bit",
                                      f"{target.name} runs {kind} weights at {list(s.weight_bits)} bits"))
        low = int(m.w_bits.min())
        want = s.group_size_for(low)
        if want != m.group_size:
            if want is None or m.weight[0].numel() % want == 0:
                changes.append(Change(name, "weight granularity", _gran(m.group_size), _gran(want),
                                      f"{target.name} runs {low}-bit {kind} weights {s.granularity.get(low)}"))
                m.w_group.fill_(want or 0)
            else:
                ungrouped = tuple(b for b in s.weight_bits if s.group_size_for(b) is None)
                new = _raise_bits(low + 1, ungrouped or s.weight_bits)
                m.w_bits[m.w_bits == low] = new
                m.w_group.fill_(0)
                changes.append(Change(name, "weight bits", f"{low}-bit", f"{new}-bit",
                                      f"{m.weight[0].numel()} inputs do not divide into {target.name}'s groups "
                                      f"of {want}"))
        _legalize_activations(name, m, kind, s, target, changes)
    if mixed == "layer":
        for name, m in model.named_modules():
            if isinstance(m, _QuantMixin) and len(set(m.w_bits.tolist())) > 1:
                top = int(m.w_bits.max())
                n_low = int((m.w_bits < top).sum())
                for b in sorted(set(m.w_bits.tolist()) - {top}):
                    _keep_values(m, m.w_bits == b, b, top)
                m.w_bits.fill_(top)
                changes.append(Change(name, "weight bits", f"mixed, {n_low} channels below {top}-bit", f"{top}-bit",
                                      "per-channel mixed precision legalized to layer level (--mixed layer)"))
    else:
        changes += split_mixed_layers(model)
    changes += _granularity_for_width(model, target)
    return changes


def _granularity_for_width(model: nn.Module, target: Target) -> list[Change]:
    """A layer raised or split to one width kept the group size chosen for its lowest width (e.g. the 8-bit part
    of a split 4/8-bit layer is per-group 32): give each layer the granularity the target runs at its width."""
    changes = []
    for name, m in model.named_modules():
        if not isinstance(m, _QuantMixin) or len(set(m.w_bits.tolist())) != 1:
            continue
        bits, kind = int(m.w_bits[0]), op_kind(m)
        s = target.support(kind)
        want = s.group_size_for(bits)
        if want != m.group_size and (want is None or m.weight[0].numel() % want == 0):
            changes.append(Change(name, "weight granularity", _gran(m.group_size), _gran(want),
                                  f"{target.name} runs {bits}-bit {kind} weights {s.granularity.get(bits)}"))
            m.w_group.fill_(want or 0)
    return changes


def _gran(group: int | None) -> str:
    return f"per-group {group}" if group else "per-channel"


def _legalize_activations(name, m, kind, s, target, changes) -> None:
    act = int(m.act_bits)
    if not act:
        return
    if int(m.w_bits.min()) < 8 and s.low_bit_activations != "static":
        if s.low_bit_activations == "float":
            m.act_bits.fill_(0)
            changes.append(Change(name, "activations", f"int{act} static", "float",
                                  f"{target.name} runs low-bit {kind} weights weight-only"))
        elif not m.act_dynamic:
            m.act_dynamic = True
            changes.append(Change(name, "activations", f"int{act} static", f"int{act} dynamic (per batch)",
                                  f"{target.name} quantizes activations of low-bit {kind} layers at run time"))
    elif act not in s.activation_bits:
        m.act_bits.fill_(0)
        changes.append(Change(name, "activations", f"int{act}", "float",
                              f"{target.name} runs {kind} activations at {list(s.activation_bits) or 'float'}"))


@torch.no_grad()
def narrow_int8_weights(model: nn.Module, runtime: str) -> list[Change]:
    """Requantize the 8-bit weights of layers that run int8 x int8 (static activations) to 7 bits, |q| <= 63.

    x86 int8 kernels without VNNI (`vpmaddubsw`) add two u8 x i8 products into a saturating int16: a pair of
    large activations meeting large same-sign weights clips. NNCF's `overflow_fix` narrows weights to 7 bits for
    the same reason. The 8-bit values the model was fine-tuned with are rounded onto a grid of twice the step and
    stay stored as int8; channels already within +-63 (e.g. 4-bit channels raised to 8) are left as they are."""
    changes = []
    for name, m in model.named_modules():
        if (not isinstance(m, _QuantMixin) or m.group_size or not int(m.act_bits) or m.act_dynamic
                or set(m.w_bits.tolist()) != {8}):
            continue
        ints = quant_params(m).int_weight
        rows = ints.reshape(len(ints), -1).abs().amax(1) > NARROW_QMAX
        if not rows.any():
            continue
        _pin_values(m, rows, float(qmax(8)) / NARROW_QMAX)  # new step = 127 * step / 63: the largest lands on 63
        changes.append(Change(name, "weight range", f"8-bit x{int(rows.sum())} channels",
                              f"7-bit values (|q| <= {NARROW_QMAX}) stored as int8",
                              f"{runtime}'s int8 kernels on this CPU (no VNNI) add u8 x i8 pairs in saturating int16"))
    return changes


class SplitLinear(nn.Module):
    """A linear layer whose output channels are split by bit width: y = cat(parts)[..., inverse]."""

    def __init__(self, parts: list[nn.Module], inverse: torch.Tensor):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.register_buffer("inverse", inverse)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1).index_select(-1, self.inverse)


class SplitEmbedding(nn.Module):
    """An embedding whose rows are split by bit width: each token reads its row from the table of its width."""

    def __init__(self, parts: list[nn.Module], table: torch.Tensor, row: torch.Tensor):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.register_buffer("table", table)  # token -> which part
        self.register_buffer("row", row)  # token -> row within its part

    def forward(self, ids):
        rows, which = self.row[ids], self.table[ids]
        out = self.parts[0](rows.clamp(max=self.parts[0].num_embeddings - 1))
        for i, part in enumerate(self.parts[1:], start=1):
            out = torch.where((which == i).unsqueeze(-1), part(rows.clamp(max=part.num_embeddings - 1)), out)
        return out


def _sub_layer(m: _QuantMixin, rows: torch.Tensor) -> _QuantMixin:
    if isinstance(m, QLinear):
        part = nn.Linear(m.in_features, len(rows), bias=m.bias is not None)
    else:
        part = nn.Embedding(len(rows), m.embedding_dim)
    with torch.no_grad():
        part.weight.copy_(m.weight[rows])
        if isinstance(m, QLinear) and m.bias is not None:
            part.bias.copy_(m.bias[rows])
    part.__class__ = type(m)
    part._init_quant(m.w_bits[rows], int(m.act_bits) or None, m.group_size)
    part.w_clip.copy_(m.w_clip[rows])
    part.act_range.copy_(m.act_range)
    part.act_dynamic = m.act_dynamic
    return part


def split_mixed_layers(model: nn.Module) -> list[Change]:
    changes = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, (QLinear, QEmbedding)) or len(set(m.w_bits.tolist())) < 2:
            continue
        widths = sorted(set(m.w_bits.tolist()), reverse=True)
        groups = [torch.nonzero(m.w_bits == b).flatten() for b in widths]
        parts = [_sub_layer(m, rows) for rows in groups]
        order = torch.cat(groups)
        if isinstance(m, QLinear):
            new: nn.Module = SplitLinear(parts, torch.argsort(order))
        else:
            table = torch.empty(m.num_embeddings, dtype=torch.long)
            row = torch.empty(m.num_embeddings, dtype=torch.long)
            for i, rows in enumerate(groups):
                table[rows] = i
                row[rows] = torch.arange(len(rows))
            new = SplitEmbedding(parts, table, row)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        sizes = ", ".join(f"{len(g)} x {b}-bit" for g, b in zip(groups, widths))
        changes.append(Change(name, "layout", "mixed bit widths in one layer", f"split: {sizes}",
                              "per-channel mixed precision kept: one part per width, outputs re-ordered by a gather"))
    return changes
