"""ExecuTorch's 8-bit dynamic activation / 4-bit weight recipe for linear layers (torchao, group 32) on XNNPACK."""

from __future__ import annotations

from pathlib import Path

import torch

from hpqdeploy.lower.executorch_rt import write_programs

from . import PEERS, Peer
from .case import BATCHES, Case


@PEERS.register("et-8da4w")
class Et8da4w(Peer):
    runtimes = ("executorch",)
    models = ("minilm",)
    summary = ("torchao quantize_(Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, PerGroup(32))) on every "
               "linear layer of the encoder and head, embeddings fp32, XnnpackPartitioner")

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        model = case.fresh_baseline()
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
        quantize_(model, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0)
        return write_programs(model, case.example, BATCHES, out)[1]
