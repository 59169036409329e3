"""The tools a hpqdeploy user would otherwise pick, each run the way its own documentation shows.

A peer builds an artifact for one runtime in a directory that runtime's `Session` (hpqdeploy.lower) can load, so
every row of the benchmark is evaluated and timed by the same code. Adding a peer is one module in this package
with a `Peer` subclass registered in `PEERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from hpqdeploy.registry import Registry

from .case import Case


class Peer(ABC):
    name: str  # set by PEERS.register
    runtimes: tuple[str, ...]
    models: tuple[str, ...]
    summary: str  # how it was run, for the table

    @abstractmethod
    def build(self, case: Case, runtime: str, out: Path) -> list[str]:
        """Write the artifact for `runtime` into `out`; return notes (a "deviation: ..." note is shown in the table)."""


PEERS: Registry[type[Peer]] = Registry("peer", __name__, skip=("case",))


def all_peers() -> list[Peer]:
    return [PEERS.get(name) for name in PEERS.names()]
