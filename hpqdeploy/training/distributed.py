"""Data-parallel training on PyTorch's own engine: `torch.distributed` with DDP, launched by `torchrun`.

    torchrun --standalone --nproc_per_node 8 -m hpqdeploy compress runs/base -o runs/hybrid --device cuda

Each process is one rank; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous. What compression needs
beyond plain DDP, and where it happens:

- the pruning and bit plan is made once, on rank 0, and broadcast, so every rank prunes and quantizes the same
  unwrapped model before it is wrapped in DDP (`broadcast`);
- calibrated activation ranges are made identical across ranks before fine-tuning (`sync_ranges`: the widest);
- every rank reads its own part of each epoch (`DistributedSampler`, reseeded per epoch) and of the evaluation
  split (`shard`, strided, without padding, so each example counts once), and the counts are summed (`all_sum`);
- only rank 0 writes the output directory and the checkpoints; every rank reads them on `--resume`;
- collectives time out (`TIMEOUT`) rather than hang, and torchrun ends every rank when one fails.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from hpqdeploy.errors import UserError

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("HPQ_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def ranks() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


def init(device: torch.device) -> Ranks:
    """Join the process group when launched as several ranks (gloo on the CPU, NCCL on CUDA); one process alone
    runs as before."""
    if not launched():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=TIMEOUT)
    return ranks()


def device_for(device: torch.device) -> torch.device:
    """A rank's device: its own GPU (LOCAL_RANK) when the run is on CUDA."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if ranks().active:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (plain data: a plan, decisions)."""
    if not ranks().active:
        return obj
    box = [obj if ranks().main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_same(obj: Any, what: str) -> None:
    """Every rank holds the same `obj`, or a one-line error naming the first rank that differs."""
    if not ranks().active:
        return
    mine = digest(obj)
    every: list[str | None] = [None] * ranks().world
    dist.all_gather_object(every, mine)
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise UserError(f"{what} differs between ranks (rank {differ[0]} against rank 0)")


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics, activation ranges) on every rank, as DDP broadcasts them
    before each forward pass: after the last step each rank has updated its own."""
    if not ranks().active:
        return
    for b in model.buffers():
        _collective(b, dist.broadcast, src=0)


def _collective(t: torch.Tensor, run, **kwargs) -> None:
    """The collective `run` on `t` in place, through a CPU copy where the backend (gloo) needs one."""
    on_backend = t if dist.get_backend() == "nccl" or t.device.type == "cpu" else t.cpu()
    run(on_backend, **kwargs)
    if on_backend is not t:
        t.copy_(on_backend)


def state_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, to compare replicas across ranks."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so counts stay exact)."""
    if not ranks().active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _collective(t, dist.all_reduce, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def sync_ranges(model: nn.Module) -> None:
    """Calibrated activation ranges identical on every rank: the widest of the ranks' ranges."""
    if not ranks().active:
        return
    from hpqdeploy.core.quantize import _ActObserver

    for m in model.modules():
        if isinstance(m, _ActObserver) and hasattr(m, "act_range") and m.act_source is None:
            _collective(m.act_range[0:1], dist.all_reduce, op=dist.ReduceOp.MIN)
            _collective(m.act_range[1:2], dist.all_reduce, op=dist.ReduceOp.MAX)


def shard(dataset: Dataset) -> Dataset:
    """This rank's part of an evaluation split: items rank, rank + world, ...; together every item exactly once."""
    r = ranks()
    if not r.active:
        return dataset
    return Subset(dataset, range(r.rank, len(dataset), r.world))


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The model in DistributedDataParallel for training (itself when one process runs)."""
    if not ranks().active:
        if sync_bn:
            raise UserError("--sync-bn synchronises BatchNorm across ranks; run under torchrun with several ranks")
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm refuses CPU tensors (use it with "
                            "--device cuda, or leave BatchNorm per rank)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (it may write), the others after it (they read); yields whether this rank is
    rank 0."""
    r = ranks()
    if r.active and not r.main:
        dist.barrier()
    yield r.main
    if r.active and r.main:
        dist.barrier()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
