"""What each runtime executes, read from `targets/<runtime>.toml`; the default when no target is named."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from hpqdeploy.errors import UserError
from hpqdeploy.resources import resource_dir

TARGETS_DIR = resource_dir("targets")
OP_KINDS = ("conv", "depthwise_conv", "linear", "embedding")


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

    def support(self, kind: str) -> OpSupport:
        return self.ops[kind]


GENERIC = Target(
    name="generic",
    channel_multiple=8,
    ops={k: OpSupport((8, 4), (8,) if k != "embedding" else (), {8: "per_channel", 4: "per_channel"})
         for k in OP_KINDS},
    runtime="no runtime restriction (storage precision; export legalizes)",
)


def target_names() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name: str | None) -> Target:
    if name is None:
        return GENERIC
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
        return Target(blob["name"], int(blob["channel_multiple"]), ops, blob.get("runtime", ""),
                      blob.get("artifact", ""))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is malformed: {exc}") from None
