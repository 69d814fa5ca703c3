"""Seeded data order and the run's position in it, so a resumed run sees the same batches.

Epoch `e` visits the examples in `torch.randperm(n)` drawn from a generator seeded with
`seed + e`; the position in the data is (epoch, index into that order). Nothing here depends on
global RNG state, so the order survives a restart by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from petkit.core.errors import ConfigError
from petkit.training.config import TrainConfig

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]
CollateFn = Callable[[list[Example]], Batch]


@dataclass
class DataPosition:
    """Where the next micro-batch starts: `epoch` and `index` into that epoch's shuffled order."""

    epoch: int = 0
    index: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of `n` examples for `epoch`."""
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


def total_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimiser steps of the run: `max_steps`, capped by `epochs` when that is set."""
    if n_examples == 0:
        raise ConfigError("train_data is empty: need at least one example")
    if config.epochs is None:
        assert config.max_steps is not None
        return config.max_steps
    # An epoch's last short batch is kept, so an epoch is ceil(n / batch_size) micro-batches.
    micro_per_epoch = math.ceil(n_examples / config.batch_size)
    from_epochs = max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
    return from_epochs if config.max_steps is None else min(from_epochs, config.max_steps)


def micro_batches(data: Sequence[Example], config: TrainConfig, pos: DataPosition,
                  collate: CollateFn) -> Iterator[list[Batch]]:
    """Endless stream of steps (lists of `grad_accum` collated micro-batches), advancing `pos`.

    An epoch's last short batch is kept; the next batch starts the next epoch's order.
    """
    order = epoch_order(len(data), config.seed, pos.epoch)
    while True:
        step: list[Batch] = []
        while len(step) < config.grad_accum:
            if pos.index >= len(order):
                pos.epoch, pos.index = pos.epoch + 1, 0
                order = epoch_order(len(data), config.seed, pos.epoch)
            chunk = order[pos.index:pos.index + config.batch_size]
            pos.index += len(chunk)
            step.append(collate([data[i] for i in chunk]))
        yield step


def eval_batches(data: Sequence[Example], batch_size: int, collate: CollateFn) -> Iterator[Batch]:
    """Collated batches of `data` in order."""
    for start in range(0, len(data), batch_size):
        yield collate(list(data[start:start + batch_size]))


def move(batch: Batch, device: torch.device) -> Batch:
    """`batch` with every tensor on `device`."""
    return {k: _to(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """From host memory to a GPU through pinned memory without waiting: a plain copy from
    pageable memory would wait for every kernel queued before it."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
