"""ExecuTorch programs as hpqdeploy writes them (one `model_b{N}.pte` per batch size), for peers built in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from hpqdeploy.lower.executorch_rt import TEXT_INPUTS, _rows
from hpqdeploy.lower.pte_reader import read_program

BATCHES = (1, 32)


def et_args(inputs) -> tuple[torch.Tensor, ...]:
    return tuple(inputs[k] for k in TEXT_INPUTS) if isinstance(inputs, dict) else (inputs,)


def write_et_programs(model: torch.nn.Module, example, out: Path) -> list[str]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    notes = []
    for batch in BATCHES:
        program = torch.export.export(model, et_args(_rows(example, batch)))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path = out / f"model_b{batch}.pte"
        path.write_bytes(edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)).buffer)
        outside = read_program(path)["non_delegated_ops"]
        notes.append(f"{path.name}: " + (", ".join(f"{op} x{n}" for op, n in sorted(outside.items()))
                                         + " outside XNNPACK" if outside else "every op delegated to XNNPACK"))
    return notes
