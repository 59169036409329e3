"""The output directory `train` and `compress` write and `compress`/`export` read.

    model.safetensors   weights (and quantizer state: bits, clipping, activation ranges)
    plan.json           model spec, pruning decisions, per-layer bit widths and scales
    metrics.json        accuracy, parameters, MACs, bytes, compression
    provenance.json     command, configuration, versions, seed, machine
    tokenizer/          text models only

Written into `<dir>.partial` and renamed into place when complete, so an interrupted or failed run never leaves
something that looks like a finished artifact.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from hpqdeploy import atomic, formats

from hpqdeploy.core import quant_points
from hpqdeploy.core.bitalloc import bit_runs, bits_from_runs
from hpqdeploy.core.prune import GroupDecision, apply_pruning
from hpqdeploy.core.qparams import weight_scales
from hpqdeploy.core.quantize import attach, quantizable_layers, _QuantMixin
from hpqdeploy.errors import UserError
from hpqdeploy.models import rebuild_model
from hpqdeploy.models.spec import LoadedModel, ModelSpec

FILES = ("model.safetensors", "plan.json", "metrics.json", "provenance.json")


@dataclass
class Artifact:
    path: Path
    model: LoadedModel
    plan: dict
    metrics: dict
    provenance: dict


def describe_quantization(model: nn.Module) -> dict[str, dict]:
    layers = {}
    for name, m in quantizable_layers(model).items():
        if not isinstance(m, _QuantMixin):
            continue
        bits = m.w_bits.tolist()
        scales = weight_scales(m.weight.detach(), m.w_bits, m.w_clip, m.group_size).squeeze(-1)
        layers[name] = {
            "op": next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules")).__name__,
            "out_channels": m.weight.shape[0],
            "bits": bit_runs(bits),
            "group_size": m.group_size,
            "act_bits": int(m.act_bits) or None,
            "act_mode": ("dynamic" if m.act_dynamic else "static") if int(m.act_bits) else "float",
            "act_range": [float(v) for v in m.act_range] if int(m.act_bits) else None,
            "clip": [round(float(c), 3) for c in m.w_clip],
            "scales": [[float(s) for s in row] for row in scales] if m.group_size else [float(s) for s in scales[:, 0]],
        }
    return layers


def plan_record(spec: ModelSpec, data: dict, plan: dict, model: nn.Module) -> dict:
    """plan.json of a compressed model: how to rebuild it, the data it is judged on, the plan (`planning.plan`'s
    decisions) and the quantizers as they ended up after fine-tuning (bit widths, scales, activation ranges)."""
    return {"model": spec.to_json(), "method": plan["method"], "data": data, "target": plan["target"],
            "channel_multiple": plan["channel_multiple"], "isa_family": plan["isa_family"],
            "pruning": plan["pruning"], "quantization": describe_quantization(model),
            "activation_points": describe_points(model, getattr(model, "hpq_points", None)),
            "layer_sensitivity": {n: b["sensitivity"] for n, b in plan["bits"].items()}}


def describe_points(model: nn.Module, points) -> dict | None:
    """`quant_points.Points` as plan.json records them, with each point's range (tied ones: their source's)."""
    if points is None:
        return None
    ranges = {}
    for name, tq in points.points.items():
        if name not in points.mirrors:
            ranges[name] = [float(v) for v in tq.act_range]
    return {**points.to_json(), "act_bits": int(next(iter(points.points.values())).act_bits), "ranges": ranges}


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torchvision", "torch-pruning", "transformers", "numpy", "hpqdeploy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "versions": versions, "threads": torch.get_num_threads()}


def save(out: Path, loaded: LoadedModel, plan: dict, metrics: dict, provenance: dict, work: Path | None = None) -> Path:
    """Write everything into the work directory (default `<out>.partial`), then rename it to `out`."""
    work = work or atomic.partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    st_save_model(loaded.module, str(work / "model.safetensors"))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(work / "tokenizer"))
    for name, blob in (("plan.json", plan), ("metrics.json", metrics), ("provenance.json", provenance)):
        if name in formats.VERSIONS:
            blob = formats.stamp(name, blob)
        (work / name).write_text(json.dumps(blob, indent=2) + "\n")
    for leftover in (*work.glob("*.ckpt"), *work.glob("analysis.pt")):
        leftover.unlink()
    return atomic.publish(work, out)


def load(path: Path) -> Artifact:
    """Rebuild the architecture from the plan, prune and quantize it as recorded, and load the weights."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory written by `hpqdeploy train` or `compress`")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise UserError(f"{path} is incomplete or not an hpqdeploy artifact: missing {', '.join(missing)}")
    try:
        plan = formats.check(path / "plan.json", json.loads((path / "plan.json").read_text()))
        metrics = formats.check(path / "metrics.json", json.loads((path / "metrics.json").read_text()))
        provenance = json.loads((path / "provenance.json").read_text())
        spec = ModelSpec.from_json(plan["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: corrupt plan/metrics/provenance JSON ({exc})") from None
    if (path / "tokenizer").is_dir():
        spec.args["tokenizer_dir"] = str(path / "tokenizer")
    loaded = rebuild_model(spec)
    try:
        apply_pruning(loaded.module, loaded.example_inputs,
                      [GroupDecision.from_json(d) for d in plan.get("pruning", [])])
        layers = quantizable_layers(loaded.module)
        unknown = sorted(set(plan.get("quantization", {})) - set(layers))
        if unknown:
            raise UserError(f"{path / 'plan.json'} quantizes layer {unknown[0]!r}, which the model does not have")
        for name, q in plan.get("quantization", {}).items():
            m = attach(layers[name], bits_from_runs(q["bits"], q["out_channels"]), q["act_bits"], q["group_size"])
            m.act_dynamic = q.get("act_mode") == "dynamic"
        if plan.get("activation_points"):
            recorded = plan["activation_points"]
            loaded.module = quant_points.restore(loaded.module, recorded, int(recorded.get("act_bits", 8)))
        st_load_model(loaded.module, str(path / "model.safetensors"), strict=True)
        quant_points.reset_ties(loaded.module)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:
        raise UserError(f"{path}: weights do not match the plan ({str(exc).splitlines()[0][:200]})") from None
    loaded.module.eval()
    loaded.spec.args.pop("tokenizer_dir", None)
    return Artifact(path, loaded, plan, metrics, provenance)


