"""One-row prefills replayed from CUDA graphs: the base's and a resident adapter's alike.

A short prefill on a GPU is bound by Python and kernel launches, not by the GPU: each adapted
layer's two small products cost about as much CPU time as a whole layer's GPU time, which is what
kept an adapter's time to first token 14-17% above the base's on an H100 (docs/serving_engine.md).
Replaying a captured graph takes the Python out of the loop for both, so what an adapter adds is
its products' GPU time alone.

Prompts are padded on the right to a power-of-two bucket (`smallest` .. `largest` tokens); causal
attention means a real token never sees the padding, and only the last real position's logits are
computed (`logits_to_keep` as a device tensor). Graphs are captured on first use: per bucket, the
base's (no adapter term at all: the exact base) and, by default, one per adapter slot, which reads
that slot's factors in place: no gather, the two cuBLAS calls a layer the eager path makes (the
fastest of the modes measured on an H100, docs/serving_engine.md); there sibling layers that read
one input (q/k/v, gate/up) share one shrink GEMM and each expand is added in place on the base
output (`share`, `LowRankBank.sharing`): fewer kernels in the chain a replay runs. A slot graph
is captured again when its slot's adapter covers other modules. With `per_slot=False` one adapter graph per bucket
serves every slot instead, reading the slot from a device tensor at replay
(`LowRankBank.indexed_row`): where `triton` is installed each adapted layer is then one fused
kernel (core.lowrank_rows: the slot loaded on the device, shrink and expand in one launch), else a
gather and the two cuBLAS calls. At most `max_graphs` graphs, holding at most `max_bytes` of
outputs, are kept, least recently used dropped first. A bank whose stacks were reallocated (a
larger rank, a new module path) has its adapter graphs captured again. Every graph shares one
memory pool: replays run one at a time and their outputs are copied out at once (the row's own
key/value cache, cut to its real length, and its last logits).

Off on the CPU, for prompts longer than `largest`, for models whose forward takes no
`logits_to_keep`, and for good after a capture fails (the failure is logged; eager prefill serves).
A padded prefill is not bit-identical to an unpadded one (other GEMM shapes), so graphed and eager
engines may differ in the last bits; within one engine every prefill of a length bucket takes the
same path, so a row batched with others still equals the same request served alone.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.core.batched_lowrank import LowRankBank
from petkit.serve.kv_batch import output_cache

LOG = logging.getLogger("petkit.serve")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor   # [1, 1, vocab]: the last real position's
    cache: Any             # the captured forward's cache object (its tensors are the graph's outputs)
    layout: object         # what it was captured against: the bank's layout (and a slot graph's paths)
    nbytes: int            # what its outputs hold on the device while it is kept


class PrefillGraphs:
    """Captured one-row prefills per prompt-length bucket; `run` returns None where it does not apply."""

    def __init__(self, model: nn.Module, bank: LowRankBank, smallest: int = 16, largest: int = 2048,
                 per_slot: bool = True, max_graphs: int = 64, max_bytes: int = 2 * 2**30,
                 kernel: bool | None = None, share: bool = True) -> None:
        self.model, self.bank = model, bank
        self.per_slot, self.max_graphs, self.max_bytes, self.share = per_slot, max_graphs, max_bytes, share
        self.kernel = importlib.util.find_spec("triton") is not None if kernel is None else kernel
        self.device = next(model.parameters()).device
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or largest
        self.smallest, self.largest = smallest, min(largest, limit)
        self.enabled = self.device.type == "cuda" and \
            "logits_to_keep" in inspect.signature(model.forward).parameters
        self._graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()  # (bucket, 0 | -1 | slot)
        self._ids: dict[int, torch.Tensor] = {}
        self._last = torch.zeros(1, dtype=torch.long, device=self.device)
        self._slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def bucket(self, length: int) -> int | None:
        size = self.smallest
        while size < length:
            size *= 2
        return size if size <= self.largest else None

    def run(self, ids: list[int], slot: int) -> tuple[torch.Tensor, Any] | None:
        """(last logits [vocab], the row's cache of len(ids) positions), or None: prefill eagerly."""
        size = self.bucket(len(ids)) if self.enabled and ids else None
        if size is None:
            return None
        which = slot if self.per_slot or slot == 0 else -1  # -1: the gathering adapter graph
        try:
            graph = self._graph(size, which)
        except Exception as err:  # noqa: BLE001  (any capture failure: eager prefill serves, said once)
            self.enabled = False
            LOG.warning("CUDA-graph prefill is off for this engine: capturing failed (%s: %s)",
                        type(err).__name__, err)
            return None
        n = len(ids)
        self._ids[size][0, :n].copy_(torch.tensor(ids, dtype=torch.long))
        self._last.fill_(n - 1)
        if which == -1:
            self._slot.fill_(slot)
        graph.graph.replay()
        return graph.logits[0, -1].clone(), _cut(graph.cache, n)

    def _graph(self, size: int, which: int) -> _Graph:
        key = (size, which)
        layout = self._layout(which)
        graph = self._graphs.get(key)
        if graph is None or graph.layout != layout:
            self._graphs.pop(key, None)  # its outputs go back to the pool before capturing again
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            graph = self._graphs[key] = self._capture(size, which, layout)
            while len(self._graphs) > 1 and sum(g.nbytes for g in self._graphs.values()) > self.max_bytes:
                self._graphs.popitem(last=False)  # least recently used first; never the new one
        self._graphs.move_to_end(key)
        return graph

    def _layout(self, which: int) -> object:
        """What a graph depends on: nothing for the base; the stacks' addresses for the gathering
        graph; for one slot's graph also the paths where that slot has terms (others captured none)."""
        if which <= 0:
            return self.bank.layout if which else None
        return self.bank.layout, tuple(p for p, stack in self.bank.stacks.items() if which in stack.used)

    def _capture(self, size: int, which: int, layout: object) -> _Graph:
        ids = self._ids.setdefault(size, torch.zeros(1, size, dtype=torch.long, device=self.device))
        self._last.fill_(size - 1)
        self._slot.zero_()

        def forward() -> Any:
            rows = self.bank.indexed_row(self._slot, self.kernel) if which == -1 else self.bank.using([which])
            with rows, self.bank.sharing() if which > 0 and self.share else nullcontext():
                return self.model(input_ids=ids, use_cache=True, logits_to_keep=self._last)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy inits, cuBLAS workspaces)
            forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward()
        cache = output_cache(out)
        held = out.logits.nbytes + sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        return _Graph(graph, out.logits, cache, layout, held)


def _cut(cache: Any, length: int) -> Any:
    """A copy of a captured cache holding its first `length` positions (the graph's own tensors
    are overwritten by the next replay)."""
    mine = copy.copy(cache)
    mine.layers = []
    for layer in cache.layers:
        own = copy.copy(layer)
        own.keys = layer.keys[:, :, :length].clone()
        own.values = layer.values[:, :, :length].clone()
        mine.layers.append(own)
    return mine
