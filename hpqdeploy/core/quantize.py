"""Fake quantization with the numerics every runtime shares.

Weights: symmetric, zero point 0, one scale per output channel (or per group of `group_size` inputs within it),
narrow range [-(2^(b-1)-1), 2^(b-1)-1], a bit width per output channel, and a per-channel clipping ratio found by
minimising the squared error. Activations: one affine 8-bit range per tensor at the input of each quantized layer,
calibrated (running mean of batch min/max) and tracked during fine-tuning. Gradients pass the rounding straight
through (STE). Modules keep their class hierarchy (`QConv2d` is an `nn.Conv2d`), so parameter names do not change.
The scales, zero points and integer weights are computed by `qparams`; while a model is exported, the layers emit
the forms of `export_form` instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpqdeploy.core.export_form import export_activation, export_input, export_weight, exporting
from hpqdeploy.core.qparams import activation_qparams, quantize_weight
from hpqdeploy.hooks import evaluating, forward

QUANTIZABLE = (nn.Conv2d, nn.Linear, nn.Embedding)
CLIP_GRID = torch.linspace(0.5, 1.0, 11)


def fake_quant_weight(w: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return w + (quantize_weight(w, bits, clip.detach(), group_size) - w).detach()


@torch.no_grad()
def search_clip(w: torch.Tensor, bits: torch.Tensor, group_size: int | None, importance: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per output channel, the clipping ratio in CLIP_GRID with the least (importance-weighted) squared error."""
    best_err = torch.full((w.shape[0],), float("inf"))
    best = torch.ones(w.shape[0])
    weight = importance if importance is not None else torch.ones_like(w)
    for ratio in CLIP_GRID:
        clip = torch.full((w.shape[0],), float(ratio))
        err = ((quantize_weight(w, bits, clip, group_size) - w) ** 2 * weight).reshape(w.shape[0], -1).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def fake_quant_activation(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """In fp32 whatever the autocast precision (an fp32 tensor passes through unchanged), so that the grid is the
    plan's under bf16 or fp16 training too."""
    return torch.fake_quantize_per_tensor_affine(x.float(), *activation_qparams(lo.float(), hi.float(), bits))


class _ActObserver:
    """An activation quantizer's state and arithmetic: an 8-bit affine range calibrated as a running mean of batch
    extremes, then tracked during fine-tuning (exponential moving average), and the fake quantization with it.

    `act_source` ties this quantizer to another one (see `quant_points`): its input is already on that quantizer's
    grid, so it neither observes nor changes it, and it reports (and exports) the source's range."""

    observing: bool = False
    momentum: float = 0.01
    act_dynamic: bool = False  # set by legalization where a runtime quantizes activations per batch (XNNPACK 4-bit)

    @property
    def act_source(self) -> "_ActObserver | None":
        return self.__dict__.get("_act_source")

    @property
    def reads_point_directly(self) -> bool:
        """Tied, and its input is the source's output itself (not through a reshape, a slice, ...)."""
        return bool(self.__dict__.get("_act_direct"))

    def tie_to(self, source: "_ActObserver | None", direct: bool = False) -> None:
        """Kept out of `_modules`: the source belongs to the model once, as a quantization point."""
        self.__dict__["_act_source"] = source
        self.__dict__["_act_direct"] = direct and source is not None
        if source is not None:
            self.act_range.copy_(source.act_range)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.act_bits) == 0:
            return x
        source = self.act_source
        if source is not None:  # already on the source's grid: re-quantizing with the same range is the identity
            self.act_range.copy_(source.act_range)
            return x
        if self.act_dynamic:
            return fake_quant_activation(x, x.detach().min(), x.detach().max(), int(self.act_bits))
        if self.observing or self.training:
            with torch.no_grad():
                lo, hi = x.min().float(), x.max().float()
                if self.observing:  # calibration: running mean of batch extremes
                    n = self._observed
                    cur = self.act_range if n else torch.stack([lo, hi])
                    self.act_range.copy_((cur * n + torch.stack([lo, hi])) / (n + 1))
                    self._observed = n + 1
                else:
                    self.act_range.lerp_(torch.stack([lo, hi]), self.momentum)
        return fake_quant_activation(x, self.act_range[0], self.act_range[1], int(self.act_bits))


class _QuantMixin(_ActObserver):
    """Adds quantization state to a Conv2d/Linear/Embedding in place (its class is swapped, its tensors kept)."""

    def _init_quant(self, bits: torch.Tensor, act_bits: int | None, group_size: int | None) -> None:
        out = self.weight.shape[0]
        self.register_buffer("w_bits", bits.to(torch.int8).clone())
        self.register_buffer("w_clip", torch.ones(out))
        self.register_buffer("act_range", torch.tensor([float("inf"), float("-inf")]))
        self.register_buffer("act_bits", torch.tensor(act_bits or 0, dtype=torch.int8))
        self.register_buffer("w_group", torch.tensor(group_size or 0, dtype=torch.int32))
        self._observed = 0

    @property
    def group_size(self) -> int | None:
        return int(self.w_group) or None

    def qweight(self) -> torch.Tensor:
        if exporting():
            return export_weight(self)
        return fake_quant_weight(self.weight, self.w_bits, self.w_clip, self.group_size)

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return export_input(self, x)
        return self.quantize_activation(x)


class TensorQuant(_ActObserver, nn.Module):
    """A quantization point on a tensor between layers (a residual add's inputs and output, a pooling op's input):
    where a runtime's integer kernels need the tensor quantized, the PyTorch model fake-quantizes it too, with the
    same numerics as a layer's input (`quant_points` places them)."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.register_buffer("act_range", torch.tensor([float("inf"), float("-inf")]))
        self.register_buffer("act_bits", torch.tensor(bits, dtype=torch.int8))
        self._observed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return export_activation(self, x)
        return self.quantize_activation(x)


class QConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    def forward(self, x):
        return F.linear(self.qinput(x), self.qweight(), self.bias)


class QEmbedding(_QuantMixin, nn.Embedding):
    def forward(self, x):
        return F.embedding(x, self.qweight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


_QCLASS = {nn.Conv2d: QConv2d, nn.Linear: QLinear, nn.Embedding: QEmbedding}


def op_kind(module: nn.Module) -> str:
    """The op kinds `targets/*.toml` speak of."""
    if isinstance(module, nn.Conv2d):
        return "depthwise_conv" if module.groups > 1 and module.groups == module.in_channels else "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "linear"


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in _QCLASS or isinstance(m, _QuantMixin)}


def attach(module: nn.Module, bits: torch.Tensor, act_bits: int | None, group_size: int | None) -> nn.Module:
    """Turn a float layer into its fake-quant twin in place."""
    if not isinstance(module, _QuantMixin):
        module.__class__ = _QCLASS[type(module)]
        act = None if isinstance(module, nn.Embedding) else act_bits
        module._init_quant(bits, act, group_size)
    else:
        module.w_bits.copy_(bits)
    return module


def set_observing(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, _ActObserver):
            m.observing = on
            if on:
                m._observed = 0


@torch.no_grad()
def calibrate(model: nn.Module, batches: list) -> None:
    with evaluating(model):
        set_observing(model, True)
        for inputs, _ in batches:
            forward(model, inputs)
        set_observing(model, False)
