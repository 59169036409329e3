"""Torch-Pruning at the same 30% ratio, fine-tuned with the same budget, fp32, lowered to each runtime.

Run as its users would: `tp.pruner.BasePruner` with L2 magnitude importance, a uniform ratio and `round_to=8`.
Its stock dependency graph does not see the CIFAR ResNets' zero-padding shortcuts (they couple channels across
stages), so, as users do, only block-internal channels are pruned (each block's first convolution); the residual
stream is left whole. For MiniLM: attention heads (whole heads, `prune_num_heads`) and FFN neurons, hidden size
left alone, as in Torch-Pruning's BERT example. The fine-tuning is the hybrid run's own configuration (epochs,
optimizer, lr, batch, distillation from the baseline) on the same training split; the pruned, fine-tuned weights
are kept in `tp-prune.safetensors` and the pruned architecture is rebuilt deterministically when loaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from hpqdeploy.core.targets import load_target
from hpqdeploy.lower.base import LoweringContext, get_runtime
from hpqdeploy.training.loop import evaluate, finetune

from . import PEERS, Peer
from .case import BATCHES, Case

RATIO, ROUND_TO = 0.3, 8


def _forward_inputs(case: Case):
    return dict(case.example) if isinstance(case.example, dict) else case.example


def prune(case: Case) -> nn.Module:
    import torch_pruning as tp

    model = case.fresh_baseline()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if case.modality == "image":
        keep = {n for n, _ in model.named_modules() if n == "conv1" or n.endswith(".conv2")}
        ignored = [m for n, m in model.named_modules() if n in keep] + linears[-1:]
        extra = {}
    else:
        attention = [m for m in model.modules() if hasattr(m, "query") and hasattr(m, "num_attention_heads")]
        ffn_in = {m for n, m in model.named_modules() if n.endswith("intermediate.dense")}
        heads = {lin: a.num_attention_heads for a in attention for lin in (a.query, a.key, a.value)}
        ignored = [m for m in linears if m not in ffn_in and m not in heads]  # everything writing the hidden size
        extra = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": RATIO}
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(model, _forward_inputs(case),
                                      importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=RATIO,
                                      ignored_layers=ignored, round_to=ROUND_TO, **extra)
        pruner.step()
    if case.modality == "text":
        for a in attention:
            a.num_attention_heads = pruner.num_heads[a.query]
            a.all_head_size = a.query.out_features
    return model.eval()


def finetuned(case: Case, root: Path) -> nn.Module:
    """The pruned model with its fine-tuned weights: trained once per model, reused by every runtime."""
    from safetensors.torch import load_file, save_file

    path = root / "tp-prune.safetensors"
    model = prune(case)
    if not path.exists():
        teacher = case.fresh_baseline() if case.train_config.distill > 0 else None
        finetune(model, case.train_loader(), case.train_config, quiet=True, teacher=teacher)
        tmp = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@PEERS.register("tp-prune")
class TpPrune(Peer):
    runtimes = ("onnxruntime", "openvino", "executorch")
    models = ("resnet20", "minilm")
    summary = (f"torch_pruning BasePruner, GroupMagnitudeImportance(p=2), ratio {RATIO}, round_to {ROUND_TO} "
               "(ResNet-20: block-internal channels only; MiniLM: heads and FFN neurons), fine-tuned with the "
               "hybrid's budget, fp32; lowered fp32 by hpqdeploy's own runtime code")

    def __init__(self):
        self._ready: dict[Path, tuple[nn.Module, str]] = {}  # per model: the fine-tuned model and its note

    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        if out.parent not in self._ready:
            model = finetuned(case, out.parent)
            params = sum(p.numel() for p in model.parameters())
            baseline = sum(p.numel() for p in case.baseline.module.parameters())
            acc = evaluate(model, case.eval_loader())["accuracy"]
            note = f"params {params:,} ({params / baseline:.3f}x); PyTorch accuracy {100 * acc:.2f}%"
            self._ready[out.parent] = model, note
        model, note = self._ready[out.parent]
        ctx = LoweringContext(copy.deepcopy(model), load_target(runtime), case.example, case.calib, case.modality,
                              BATCHES)
        return [note, *get_runtime(runtime).lower(ctx, out).notes]
