"""What every measurement of benchmarks/hybrid.py shares: where rows go, how they are printed,
test accuracy, and the memory probes (peak RSS, weights held by live modules)."""
from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import petkit as pk

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("HYBRID_OUT", ROOT / "runs" / "hybrid"))  # a smoke run: elsewhere


def int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (a flag's type)."""
    return [int(x) for x in text.split(",") if x]


def record(system: str, row: dict[str, Any]) -> None:
    """Print and append one result row to OUT/<system>.jsonl."""
    OUT.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT / f"{system}.jsonl", "a") as fh:
        fh.write(line + "\n")


def partial(row: dict[str, Any]) -> None:
    """The row so far, to stderr (a slow run can be read before it ends)."""
    print("partial " + json.dumps(row, default=str), file=sys.stderr, flush=True)


def accuracy(model: torch.nn.Module, data: list[dict], pad_id: int, **kw: Any) -> float:
    """Test accuracy (eval mode, no grad)."""
    with torch.no_grad():
        return pk.evaluate(model, data, batch_size=32, pad_id=pad_id, **kw)["accuracy"]


class PeakRss:
    """Peak resident memory (MB) above the level at entry, sampled every 20 ms."""

    def __enter__(self) -> "PeakRss":
        self.start, self.peak, self.done = self.rss(), 0.0, False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def sample(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(0.02)

    def __exit__(self, *exc: Any) -> None:
        self.done = True
        self.thread.join()


def weights_held_mb() -> float:
    """MB of distinct parameter and buffer storages held by every live nn.Module."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore")
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for module in modules:
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


class ReferenceProbe:
    """Weights held in memory before DPO and during its first reference pass (a forward under
    no_grad): their difference is any second copy the reference needed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.before, self.during = weights_held_mb(), None
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, *_: Any) -> None:
        if not torch.is_grad_enabled() and self.during is None:
            self.during = weights_held_mb()
            self.handle.remove()
