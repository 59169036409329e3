"""What each runtime executes, read from `targets/<runtime>.toml`; the default when no target is named."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace

from hpqdeploy.errors import UserError
from hpqdeploy.lower.cpu import isa_family
from hpqdeploy.resources import resource_dir

TARGETS_DIR = resource_dir("targets")
OP_KINDS = ("conv", "depthwise_conv", "linear", "embedding")
QUANTIZED_OP_KINDS = ("add", "avg_pool", "cat")  # what `quant_points` can place points around


@dataclass(frozen=True)
class OpSupport:
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    granularity: dict[int, str] = field(default_factory=dict)  # bits -> "per_channel" | "per_group"
    group_size: int | None = None
    low_bit_activations: str = "static"  # "static" int8 | "dynamic" int8 per batch | "float", for weights < 8 bits

    def group_size_for(self, bits: int) -> int | None:
        return self.group_size if self.granularity.get(bits) == "per_group" else None


@dataclass(frozen=True)
class Target:
    name: str
    channel_multiple: int
    ops: dict[str, OpSupport]
    runtime: str = ""
    artifact: str = ""
    # ops between layers whose tensors the runtime's integer kernels need quantized (`quant_points`)
    quantized_ops: tuple[str, ...] = ("add", "avg_pool", "cat")
    # channel multiples measured per ISA family (bench/width_bench.py); `channel_multiple` is the one for this
    # machine's family, or the TOML's default where its family was not measured
    channel_multiple_by_isa: tuple[tuple[str, int], ...] = ()
    isa_family: str = ""

    def support(self, kind: str) -> OpSupport:
        return self.ops[kind]


GENERIC = Target(
    name="generic",
    channel_multiple=8,  # `load_target(None)` raises it to every runtime's multiple on this machine
    ops={k: OpSupport((8, 4), (8,) if k != "embedding" else (), {8: "per_channel", 4: "per_channel"})
         for k in OP_KINDS},
    runtime="no runtime restriction (storage precision; export legalizes)",
)


def target_names() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name: str | None) -> Target:
    """A runtime's target, its channel multiple resolved for this machine's ISA family; with no name the generic
    target, whose channel multiple is the least common multiple of every runtime's here (a plan made for no
    runtime in particular keeps widths every runtime runs fast)."""
    if name is None or name == GENERIC.name:
        multiples = [load_target(n).channel_multiple for n in target_names()]
        multiple = math.lcm(GENERIC.channel_multiple, *multiples)
        return replace(GENERIC, channel_multiple=multiple, isa_family=isa_family())
    path = TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown target {name!r}; known: {', '.join(target_names())}")
    try:
        blob = tomllib.loads(path.read_text())
        ops = {}
        for kind in OP_KINDS:
            o = blob["ops"][kind]
            ops[kind] = OpSupport(tuple(o["weight_bits"]), tuple(o.get("activation_bits", ())),
                                  {int(b): g for b, g in o.get("granularity", {}).items()}, o.get("group_size"),
                                  o.get("low_bit_activations", "static"))
        quantized_ops = tuple(blob.get("quantized_ops", Target.quantized_ops))
        by_isa = {str(k): int(v) for k, v in blob.get("channel_multiple_by_isa", {}).items()}
        family = isa_family()
        multiple = by_isa.get(family, int(blob["channel_multiple"]))
        unknown = sorted(set(quantized_ops) - set(QUANTIZED_OP_KINDS))
        if unknown:
            raise ValueError(f"quantized_ops: unknown op kind {unknown[0]!r} (known: {', '.join(QUANTIZED_OP_KINDS)})")
        return Target(blob["name"], multiple, ops, blob.get("runtime", ""), blob.get("artifact", ""), quantized_ops,
                      tuple(sorted(by_isa.items())), family)
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is malformed: {exc}") from None
