"""The tools a hpqdeploy user would otherwise pick, each run the way its own documentation shows.

A peer builds an artifact for one runtime in a directory that runtime's `Session` (hpqdeploy.lower) can load, so
every row of the benchmark is evaluated and timed by the same code. Adding a peer is one module with `@peer`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .case import Case

Build = Callable[[Case, str, Path], list[str]]  # (case, runtime, output dir) -> notes


@dataclass(frozen=True)
class Peer:
    name: str
    runtimes: tuple[str, ...]
    models: tuple[str, ...]
    summary: str
    build: Build


PEERS: dict[str, Peer] = {}
_MODULES = ("nncf_ptq", "ort_static", "et_pt2e", "tp_prune", "nncf_weights", "et_8da4w")


def peer(name: str, runtimes: tuple[str, ...], models: tuple[str, ...], summary: str):
    def register(build: Build) -> Build:
        PEERS[name] = Peer(name, runtimes, models, summary, build)
        return build
    return register


def all_peers() -> dict[str, Peer]:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return PEERS
