"""`hpqdeploy export`: legalize a compressed model for one runtime, lower it, and prove it inside that runtime.

The artifact is evaluated by the runtime itself on the evaluation split and compared with the PyTorch compressed
model on the same inputs (accuracy, top-1 agreement, max abs difference of logits); the ops and precisions it
really holds are read back from the artifact. Everything lands in `export.json` beside the artifact.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from hpqdeploy import artifact, atomic, formats
from hpqdeploy.config import DataOptions, ExportOptions
from hpqdeploy.core.targets import load_target
from hpqdeploy.data import load_data
from hpqdeploy.errors import UserError
from hpqdeploy.hooks import forward
from hpqdeploy.lower.base import LoweringContext, get_runtime
from hpqdeploy.lower.cpu import has_vnni
from hpqdeploy.lower.legalize import legalize, narrow_int8_weights
from hpqdeploy.models.hf_text import text_collate
from hpqdeploy.training.loop import loader, progress


def fixed_collate(loaded):
    if loaded.modality == "text":
        return text_collate(loaded.tokenizer, int(loaded.spec.args.get("max_length", 64)), fixed=True)
    return loaded.collate


def to_numpy(inputs) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        return {k: v.numpy() for k, v in inputs.items()}
    return inputs.numpy()


def _pad(inputs, batch: int):
    """Pad a short last batch to the fixed batch size (runtimes with static shapes)."""
    def pad(t):
        n = t.shape[0]
        return t if n == batch else torch.cat([t, t[-1:].expand(batch - n, *t.shape[1:])])

    return {k: pad(v) for k, v in inputs.items()} if isinstance(inputs, dict) else pad(inputs)


def run_export(artifact_dir: Path, out: Path, opts: ExportOptions, quiet: bool = False, command: str = "") -> dict:
    runtime = get_runtime(opts.target)
    if opts.overflow_fix == "on" and not runtime.int8_pairs_saturate:
        raise UserError(f"--overflow-fix on: {runtime.name}'s int8 kernels do not saturate, nothing to fix")
    runtime.require()
    target = load_target(opts.target)
    atomic.check_output(out)
    art = artifact.load(artifact_dir)
    loaded = art.model
    data = DataOptions(**art.plan["data"])
    data = replace(data, data_dir=opts.data_dir or data.data_dir,
                   eval_limit=opts.eval_limit if opts.eval_limit is not None else data.eval_limit)
    splits = load_data(data.name, data.request(0))
    collate = fixed_collate(loaded)
    reference = loaded.module.eval()
    legal = copy.deepcopy(reference)
    changes = legalize(legal, target, opts.mixed)
    overflow_fix = _overflow_fix(runtime, opts.overflow_fix)
    if overflow_fix and runtime.overflow_fix_by == "narrow":
        changes += narrow_int8_weights(legal, runtime.name)
    legal.eval()
    calib = list(loader(splits.calib, collate, opts.batch_size, shuffle=False))[: opts.calib_batches]
    example = next(iter(loader(splits.eval, collate, 1, shuffle=False)))[0]
    ctx = LoweringContext(legal, target, example, calib, loaded.modality, tuple(sorted({1, opts.batch_size})),
                          overflow_fix)
    with atomic.directory(out) as work:
        start = time.time()
        lowered = runtime.lower(ctx, work)
        lower_seconds = time.time() - start
        session = runtime.load(work, threads=opts.threads)
        evaluation = _evaluate(session, reference, legal, loader(splits.eval, collate, opts.batch_size, False),
                               opts.batch_size, quiet)
        contents = runtime.inspect(work)
        _warn_float_fallbacks(runtime.name, contents.get("fast_path"), lowered.notes)
        files = [p for p in work.rglob("*") if p.is_file()]
        report = {
            "target": target.name, "runtime": runtime.name, "source": str(artifact_dir),
            "method": art.plan["method"], "files": {str(p.relative_to(work)): p.stat().st_size for p in files},
            "bytes_on_disk": sum(p.stat().st_size for p in lowered.files),
            "legalization": [c.to_json() for c in changes], "mixed": opts.mixed,
            "notes": lowered.notes, "session": session.info(), "contents": contents, **evaluation,
            "lower_seconds": round(lower_seconds, 2), "threads": opts.threads, "command": command,
            "options": asdict(opts), **artifact.environment(),
        }
        report = formats.stamp("export.json", report)
        (work / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _warn_float_fallbacks(runtime: str, fast_path: dict | None, notes: list[str]) -> None:
    """The read-back of which quantized layers the runtime runs in integer kernels, as a note, and a warning for
    each one it runs in float (slower than the plan promises, with the plan's numerics)."""
    if not fast_path:
        return
    n, k = fast_path["quantized"], fast_path["integer"]
    notes.append(f"{k} of {n} int8 layer(s) run in {runtime}'s integer kernels (read back from the runtime)")
    if fast_path["float"]:
        names = ", ".join(fast_path["float"][:5]) + (", ..." if len(fast_path["float"]) > 5 else "")
        warnings.warn(f"{len(fast_path['float'])} of {n} int8 layer(s) run in float on {runtime}: {names}",
                      stacklevel=2)


def _overflow_fix(runtime, overflow_fix: str) -> bool:
    """Whether the artifact's int8 kernels must be exact on CPUs without VNNI. "auto" decides on this machine, where
    the artifact is verified; pass "on" for non-VNNI deployment CPUs."""
    if overflow_fix == "auto":
        return runtime.int8_pairs_saturate and has_vnni() is False
    return overflow_fix == "on"


@torch.no_grad()
def _evaluate(session, reference, legal, data, batch: int, quiet: bool) -> dict:
    correct = {"runtime": 0, "pytorch": 0, "pytorch_legalized": 0}
    agree = total = 0
    max_diff = 0.0
    with progress(quiet) as bar:
        task = bar.add_task("evaluate in runtime", total=len(data), status="")
        for inputs, labels in data:
            n = labels.numel()
            padded = _pad(inputs, batch)
            ref = forward(reference, inputs)
            leg = forward(legal, inputs)
            got = torch.from_numpy(np.asarray(session(to_numpy(padded)))[:n]).float()
            correct["runtime"] += (got.argmax(1) == labels).sum().item()
            correct["pytorch"] += (ref.argmax(1) == labels).sum().item()
            correct["pytorch_legalized"] += (leg.argmax(1) == labels).sum().item()
            agree += (got.argmax(1) == ref.argmax(1)).sum().item()
            max_diff = max(max_diff, (got - ref).abs().max().item())
            total += n
            bar.update(task, advance=1, status=f"acc {correct['runtime'] / total:.4f}")
    acc = {k: v / max(total, 1) for k, v in correct.items()}
    return {"accuracy": acc["runtime"], "accuracy_pytorch": acc["pytorch"],
            "accuracy_pytorch_legalized": acc["pytorch_legalized"],
            "accuracy_delta_points": round(100 * (acc["runtime"] - acc["pytorch"]), 3),
            "top1_agreement": agree / max(total, 1), "max_abs_diff": max_diff, "eval_examples": total}
