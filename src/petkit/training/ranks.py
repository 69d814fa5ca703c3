"""The job's processes: torchrun's process group, launching, petkit's own collectives, and how a
micro-batch is cut into per-rank row shards (training/distributed.py uses these).

A micro-batch of B rows is cut into W contiguous shards (sizes differ by at most one); rank r's
loss is scaled by W * units_r / units (units: predicted tokens of a causal LM, else examples), so
the mean over ranks of the scaled losses is the whole micro-batch's loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from petkit.core.errors import ConfigError
from petkit.training.steppers import Batch

TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "PETKIT_DIST_TIMEOUT", 600.0
IGNORE_INDEX = -100

def world_size() -> int:
    """Processes in the job: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside a distributed job)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def init_from_env() -> bool:
    """Join torchrun's process group (NCCL on GPUs, else gloo) once; False outside torchrun.

    Call it before loading the model: on GPUs it makes `cuda` mean this rank's device.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(seconds=timeout))
    return True


def cleanup() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str], verbose: bool = False) -> int:
    """Run `python -m petkit <argv>` on `nproc` local processes through torchrun; its exit code.
    Unless `verbose`, OMP_NUM_THREADS (when unset) is given the value torchrun would give it, one
    thread per process, so torchrun prints no banner saying it did."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be an int >= 1, got {nproc!r}")
    args = list(argv)
    for i, item in enumerate(args):  # drop --nproc N / --nproc=N: the workers must not relaunch
        if item == "--nproc":
            del args[i:i + 2]
            break
        if item.startswith("--nproc="):
            del args[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "petkit", *args]
    env = dict(os.environ)
    if not verbose and nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


class RankGroup:
    """The job's ranks and the few collectives petkit makes itself, counted in bytes sent."""

    def __init__(self) -> None:
        """The default process group (must be initialised)."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.bytes = 0  # payload of every collective made through this object

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def mean(self, values: Sequence[float]) -> list[float]:
        """Element-wise mean over ranks of `values` (one all-reduce of float64s)."""
        t = self._tensor(values)
        dist.all_reduce(t)
        self.bytes += t.numel() * t.element_size()
        return (t / self.world).tolist()

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part [lo, hi) of n items (sizes differ by at most one)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def gather(self, values: Sequence[float], n: int) -> list[float]:
        """Every rank's `values` (its `share(n)` of n items) concatenated in rank order."""
        width = -(-n // self.world)
        padded = self._tensor(list(values) + [0.0] * (width - len(values)))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        self.bytes += padded.numel() * padded.element_size()
        out: list[float] = []
        for r, part in enumerate(parts):
            lo, hi = r * n // self.world, (r + 1) * n // self.world
            out += part[:hi - lo].tolist()
        return out


@dataclass
class Shard:
    """A rank's rows of a micro-batch and the weight that makes the ranks' mean exact."""

    batch: Batch
    weight: float


def _rows(batch: Batch) -> int:
    first = batch["labels"] if "labels" in batch else next(iter(batch.values()))
    return len(first)


def _units(batch: Batch, causal: bool) -> torch.Tensor:
    """Per-row count of what the loss averages over: predicted tokens (causal LM) or 1."""
    labels = batch.get("labels")
    if labels is None or labels.dim() == 1:
        return torch.ones(_rows(batch))
    kept = labels[:, 1:] if causal else labels
    return (kept != IGNORE_INDEX).sum(dim=1).double()


def _take(batch: Batch, lo: int, hi: int, rows: int) -> Batch:
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and len(v) == rows else v
            for k, v in batch.items()}


def cut(batch: Batch, rank_: int, world: int, causal: bool) -> Shard:
    """Rank `rank_`'s contiguous rows of `batch` and its loss weight W * units_r / units.

    A rank left without rows (or without predicted tokens) computes one row at weight 0, so it
    still joins the gradient reduction.
    """
    rows = _rows(batch)
    units = _units(batch, causal)
    lo, hi = rank_ * rows // world, (rank_ + 1) * rows // world
    total, mine = float(units.sum()), float(units[lo:hi].sum())
    if mine == 0 or total == 0:
        row = int(units.argmax())
        return Shard(_take(batch, row, row + 1, rows), 0.0)
    return Shard(_take(batch, lo, hi, rows), world * mine / total)
