"""ExecuTorch with the XNNPACK delegate: one `.pte` program per fixed batch size, from the plan's per-layer configs.

XNNPACK narrows a dynamic batch dimension during lowering, so each batch size the export needs gets its own program
(`model_b{N}.pte`); `Session` picks the program matching the input batch. How the plan becomes XNNPACK's
quantization is in `executorch_quant`. The thread pool is process-wide and must be sized before any program loads:
resizing it afterwards crashes, so a second size in one process is refused.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from hpqdeploy.errors import UserError
from hpqdeploy.lower.base import Lowered, LoweringContext, Runtime, Session, register_runtime
from hpqdeploy.lower.executorch_quant import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY, apply_torchao, float_twin, \
    keep_plan_ranges, selection_layers, static_quantizer
from hpqdeploy.lower.pte_reader import read_program, xnnpack_fast_path

TEXT_INPUTS = ("input_ids", "attention_mask")  # `TextClassifier.forward` order
_PROGRAM = "model_b{}.pte"
_programs_loaded = False


def program_args(inputs) -> tuple[torch.Tensor, ...]:
    """A batch as the program's positional inputs."""
    return tuple(inputs[k] for k in TEXT_INPUTS) if isinstance(inputs, dict) else (inputs,)


def _rows(inputs, n: int):
    """`inputs` with its batch made n rows long (first rows repeated): an example of the right shape."""
    def fit(t):
        reps = math.ceil(n / t.shape[0])
        return t.repeat(reps, *[1] * (t.dim() - 1))[:n].contiguous()

    return {k: fit(v) for k, v in inputs.items()} if isinstance(inputs, dict) else fit(inputs)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def write_programs(model: torch.nn.Module, example_inputs, batch_sizes,
                   out_dir: Path) -> tuple[list[Path], list[str]]:
    """One XNNPACK-delegated program per batch size (`model_b{N}.pte`), with what each left outside XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    files, notes = [], []
    for batch in sorted(set(batch_sizes)):
        program = torch.export.export(model, program_args(_rows(example_inputs, batch)))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path = out_dir / _PROGRAM.format(batch)
        fuse = ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)  # -> quantized embedding kernels
        path.write_bytes(edge.to_executorch(fuse).buffer)
        outside = read_program(path)["non_delegated_ops"]
        if any(op.startswith("torchao::") for op in outside):
            raise UserError(f"ExecuTorch has no kernel for {sorted(outside)}: a quantized pattern was not fused")
        files.append(path)
        notes.append(f"{path.name}: " + (", ".join(f"{op} x{n}" for op, n in sorted(outside.items()))
                                         + " not delegated to XNNPACK" if outside else "every op delegated to XNNPACK"))
    return files, notes


def _quantize_static(model, plans, ctx: LoweringContext) -> tuple[torch.nn.Module, list[str]]:
    """PT2E static int8 for the plan's static layers: export with a free batch, observe, convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not ctx.calib:
        raise UserError("ExecuTorch lowering needs calibration batches for XNNPACK's static int8 (none given)")
    example = program_args(_rows(ctx.example_inputs, 2))
    free_batch = tuple({0: torch.export.Dim.AUTO} for _ in example)
    graph = torch.export.export(model, example, dynamic_shapes=free_batch).module()
    static = {n for n, p in plans.items() if p.role == STATIC}
    # the shortcuts' one-hot selections run int8 beside them (float, each would need a dequantize and a quantize)
    static |= selection_layers(model)
    prepared = prepare_pt2e(graph, static_quantizer(static, ctx.modality))
    with torch.no_grad():
        for inputs, _ in ctx.calib:
            prepared(*program_args(inputs))
    kept, shared = keep_plan_ranges(prepared, plans)
    notes = [f"activation scales: the plan's act_range kept at the input of {kept} static int8 layers"
             + (f"; calibrated on the calibration split ({len(ctx.calib)} batches) where XNNPACK shares the "
                f"observer with another tensor (or the plan has no range): {', '.join(shared)}" if shared else "")
             + "; XNNPACK's extra quantization points (layer outputs"
             + (", adds, pools" if ctx.modality == "image" else "")
             + ") calibrated on the same split (histogram observer)"]
    return convert_pt2e(prepared), notes


def _widths(plans, role: str) -> str:
    return ", ".join(sorted({f"{p.params.bits}-bit" + (f" group {p.params.group_size}" if p.params.group_size else "")
                             for p in plans.values() if p.role == role}))


@register_runtime("executorch")
class ExecuTorchRuntime(Runtime):
    extra = "executorch"
    modules = ("executorch", "torchao")

    def lower(self, ctx: LoweringContext, out_dir: Path) -> Lowered:
        self.require()
        model, plans, notes = float_twin(ctx.model, ctx.example_inputs)
        roles = Counter(p.role for p in plans.values())
        apply_torchao(model, plans)
        if roles[DYNAMIC]:
            grouped = any(p.params.group_size for p in plans.values() if p.role == DYNAMIC)
            notes.append(f"{roles[DYNAMIC]} linear layer(s) ({_widths(plans, DYNAMIC)} weights) through torchao "
                         "Int8DynamicActivationIntxWeightConfig holding the plan's integer weights and scales; their "
                         "activations are quantized per token at run time (the plan: per tensor)"
                         + ("; XNNPACK stores per-group scales as bfloat16 (rounded by <= 2^-8)" if grouped else ""))
        if roles[WEIGHT_ONLY]:
            notes.append(f"{roles[WEIGHT_ONLY]} embedding table(s) ({_widths(plans, WEIGHT_ONLY)}) through torchao "
                         "IntxWeightOnlyConfig holding the plan's integers and scales, run by ExecuTorch's quantized "
                         "embedding kernels (portable, outside XNNPACK)")
        if not plans:
            notes.append("no quantized layers in the plan: the program runs float32")
        if roles[FLOAT]:
            notes.append(f"{roles[FLOAT]} layer(s) with float activations run float, holding the plan's dequantized "
                         "weights (stored as float32: XNNPACK's weight-only intx linear is unreliable)")
        try:
            if roles[STATIC]:
                model, qnotes = _quantize_static(model, plans, ctx)
                notes += [f"{roles[STATIC]} layer(s) static int8 (PT2E XNNPACKQuantizer, symmetric per-channel "
                          "weights reproducing the plan's scales)"] + qnotes
            files, program_notes = write_programs(model, ctx.example_inputs, ctx.batch_sizes, out_dir)
            notes += program_notes
        except UserError:
            raise
        except Exception as exc:  # an op or pattern ExecuTorch cannot take: one line for the user
            raise UserError(f"ExecuTorch lowering failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        notes.append("one program per fixed batch size (XNNPACK narrows a dynamic batch bound); each holds its own "
                     "copy of the weights")
        return Lowered(files, notes)

    def load(self, out_dir: Path, threads: int = 1) -> Session:
        from executorch.runtime import Runtime as EtRuntime

        global _programs_loaded
        paths = sorted(Path(out_dir).glob(_PROGRAM.format("*")))
        if not paths:
            raise UserError(f"{out_dir} holds no ExecuTorch program ({_PROGRAM.format('<N>')}); run export first")
        actual = _set_threads(threads)
        _load_quantized_kernels()
        methods = {}
        for path in paths:
            try:
                methods[int(path.stem.removeprefix("model_b"))] = \
                    EtRuntime.get().load_program(path).load_method("forward")
            except (RuntimeError, ValueError) as exc:
                raise UserError(f"{path} is not a loadable ExecuTorch program: {_first_line(exc)}") from None
            _programs_loaded = True
        return ExecuTorchSession(methods, actual)

    def inspect(self, out_dir: Path) -> dict:
        paths = sorted(Path(out_dir).glob(_PROGRAM.format("*")), key=lambda p: int(p.stem.removeprefix("model_b")))
        if not paths:
            raise UserError(f"{out_dir} holds no ExecuTorch program ({_PROGRAM.format('<N>')})")
        programs = {p.name: read_program(p) for p in paths}
        first = programs[paths[0].name]
        return {"read_from": "the .pte files themselves: the ExecuTorch program flatbuffer (kernel calls, delegate "
                             "calls, constant tensors) and each XNNPACK delegate's flatbuffer (tensor datatypes, "
                             "shapes, constant sizes); weights below are from " + paths[0].name,
                "ops": first["ops"], "delegates": first["delegates"], "xnnpack_ops": first["xnnpack_ops"],
                "non_delegated_ops": first["non_delegated_ops"], "weights": first["weights"],
                "weight_bytes": first["weight_bytes"], "other_constants": first["other_constants"],
                "programs": {name: {k: v[k] for k in ("delegates", "non_delegated_ops", "bytes")}
                             for name, v in programs.items()},
                "fast_path": xnnpack_fast_path(paths[0])}


def _set_threads(threads: int) -> int:
    from executorch.extension.pybindings import portable_lib

    current = portable_lib._threadpool_get_thread_count()
    if current != threads:
        if _programs_loaded:
            raise UserError(f"the ExecuTorch thread pool already runs {current} threads in this process and cannot "
                            f"be resized once a program is loaded; run with {threads} threads in a new process")
        portable_lib._unsafe_reset_threadpool(threads)
    return portable_lib._threadpool_get_thread_count()


def _load_quantized_kernels() -> None:
    """ExecuTorch's quantized kernels (the embedding_byte / embedding_4bit the programs call) ship as a library of
    their own; loading it registers them with the runtime the Python bindings use."""
    import ctypes

    import executorch

    library = Path(list(executorch.__path__)[0]) / "lib" / "libexecutorch_kernels_quantized.so"
    if library.is_file():
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # a second dlopen of one path is a no-op


class ExecuTorchSession(Session):
    def __init__(self, methods: dict, threads: int):
        self.methods = methods
        self.threads = threads

    def __call__(self, inputs) -> np.ndarray:
        arrays = [np.asarray(inputs[k]) for k in TEXT_INPUTS] if isinstance(inputs, dict) else [np.asarray(inputs)]
        arrays = [a.astype(np.int64 if a.dtype.kind in "iu" else np.float32, copy=False) for a in arrays]
        n, start, outs = arrays[0].shape[0], 0, []
        while start < n:  # the program of the input's batch; otherwise pad up (or cut into the largest batch)
            left = n - start
            batch = min((b for b in self.methods if b >= left), default=max(self.methods))
            take = min(batch, left)
            chunk = [a[start:start + take] for a in arrays]
            if take < batch:
                chunk = [np.concatenate([c, np.repeat(c[-1:], batch - take, axis=0)]) for c in chunk]
            out = self.methods[batch].execute([torch.from_numpy(np.ascontiguousarray(c)) for c in chunk])[0]
            outs.append(out[:take].numpy())
            start += take
        return np.concatenate(outs)

    def info(self) -> dict:
        return {"programs": [_PROGRAM.format(b) for b in sorted(self.methods)], "threads": self.threads,
                "backend": "XnnpackBackend"}
