"""What compressing a base buys: bytes a deployment stores, and forward time before / after pruning.

Used by the benchmark harness (`petkit bench` arms with `quantize` / `prune`) and by
`benchmarks/compressed.py` (the table of docs/compressed.md).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from petkit.core.delta import innermost
from petkit.methods.peqa import PeqaLinear


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the weights a deployment keeps: quantised layers as stored (packed 4/8-bit plus their
    scales), PEQA integers packed at `bits` per weight (its full-precision base not counted), pruned
    models at their new shapes; tied tensors once."""
    total, skip = 0, set()
    for module in model.modules():
        if isinstance(module, PeqaLinear):  # W0 is replaced by packed codes + zero points + scales
            skip |= {id(innermost(module.base).weight), id(module.codes), id(module.zeros)}
            total += (module.codes.numel() + module.zeros.numel()) * module.bits // 8
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}
    return total + sum(t.numel() * t.element_size() for t in tensors.values())


def forward_seconds(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one no-grad forward of `batch` in eval mode, after one warm-up
    forward; the model's train/eval mode is restored after.

    Eval mode because a model straight out of training is in train mode, and a BERT's attention
    dropout then takes a slower attention path (measured ~1.8x on minilm-l6). CPU time is the
    steadier of the two on a shared machine.
    """
    walls, cpus = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(**batch)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            model(**batch)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    model.train(was_training)
    return sorted(walls)[repeats // 2], sorted(cpus)[repeats // 2]
