"""ExecuTorch's stock XNNPACK INT8 recipe: PT2E with `XNNPACKQuantizer` (symmetric, per-channel, static)."""

from __future__ import annotations

from pathlib import Path

import torch

from hpqdeploy.lower.executorch_rt import program_args, write_programs

from . import PEERS, Peer
from .case import BATCHES, Case


def _quantizer_class(modality: str) -> tuple[type, list[str]]:
    """Stock XNNPACKQuantizer, except on transformers' BERT, where its annotation transform makes the attention
    mask's integer index arithmetic float ("IndexError: tensors used as indices must be long..."): there the same
    transform, restricted to floating-point ops (hpqdeploy's fix)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    if modality != "text":
        return XNNPACKQuantizer, []
    from hpqdeploy.lower.executorch_quant import _float_scalars_to_attrs

    class FloatOpsQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model):
            return _float_scalars_to_attrs(model)

    return FloatOpsQuantizer, ["deviation: stock XNNPACKQuantizer fails on this BERT (IndexError: its "
                               "scalar-to-tensor transform turns the attention mask's integer arithmetic float); ran "
                               "with that transform limited to float ops"]


def _swap_shortcuts(model: torch.nn.Module) -> list[str]:
    """The stock program fails to load ("Failed to create StaticConstantPad node"): XNNPACK rejects the pad of the
    CIFAR ResNet's zero-padding shortcut. Swap each for the exact one-hot strided 1x1 convolution hpqdeploy's own
    lowering uses."""
    from hpqdeploy.lower.executorch_quant import _replace, _selection_conv
    from hpqdeploy.models.cifar_resnet import ChannelMapShortcut

    shortcuts = [(n, m) for n, m in model.named_modules() if isinstance(m, ChannelMapShortcut)]
    for name, m in shortcuts:
        _replace(model, name, _selection_conv(m))
    if not shortcuts:
        return []
    return ["deviation: the stock program does not load (XNNPACK: 'Failed to create StaticConstantPad node', the "
            f"zero-padding shortcut); {len(shortcuts)} shortcuts swapped for exact one-hot 1x1 convolutions "
            "(hpqdeploy's rewrite) before quantization"]


@PEERS.register("et-pt2e")
class EtPt2e(Peer):
    runtimes = ("executorch",)
    models = ("resnet20", "minilm")
    summary = ("XNNPACKQuantizer.set_global(get_symmetric_quantization_config(is_per_channel=True)), prepare_pt2e, "
               "calibration on the same 256 examples, convert_pt2e, XnnpackPartitioner")

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        model = case.fresh_baseline()
        quantizer_class, notes = _quantizer_class(case.modality)
        notes += _swap_shortcuts(model)
        example = program_args(case.calib[0][0])
        free_batch = tuple({0: torch.export.Dim.AUTO} for _ in example)
        graph = torch.export.export(model, example, dynamic_shapes=free_batch).module()
        quantizer = quantizer_class().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for inputs, _ in case.calib:
                prepared(*program_args(inputs))
        return notes + write_programs(convert_pt2e(prepared), case.example, BATCHES, out)[1]
