"""The engine's adapters: every registered one on the host, up to `resident` of them in the batched
low-rank stacks (core.batched_lowrank.LowRankBank), least recently used evicted first.

An adapter folder is checked and read by `load_adapter` (fingerprint, shapes, checksum: a refused
folder changes nothing), its per-module `RowTerms` copied to the host, and its wrappers detached
again: the model itself stays the plain base. A request's adapter is made resident when its row
is admitted (`acquire`: a host -> device copy into a free or evicted slot, timed as the swap
cost) and pinned until the row leaves (`release`); a pinned slot is never evicted.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

import torch
from torch import nn

from petkit.core.batched_lowrank import LowRankBank
from petkit.core.capabilities import RowBatchable, RowTerms, capable_text
from petkit.core.errors import AdapterLoadError, PetkitError
from petkit.core.io import load_adapter
from petkit.core.mixed_batch import adapter_terms, batchable
from petkit.core.model import detach
from petkit.core.state import adapters as attached


class AdapterPool:
    def __init__(self, model: nn.Module, resident: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.bank = LowRankBank(model, resident + 1)
        self.host: dict[str, dict[str, RowTerms]] = {}
        self.methods: dict[str, str] = {}
        self.slots: OrderedDict[str, int] = OrderedDict()  # resident, least recently used first
        self.pins: dict[str, int] = {}
        self.swaps = 0
        self.swap_seconds = 0.0

    # ---- registry (host) ----
    def load(self, name: str, path: str | os.PathLike) -> str:
        """Read and check the folder; keep its terms on the host. Returns the method name."""
        try:
            load_adapter(self.model, path, name=name)
        except PetkitError as err:
            raise AdapterLoadError(str(err)) from err
        method = attached(self.model)[name].config.method
        try:
            if not batchable(self.model, (name,)):
                raise AdapterLoadError(
                    f"adapter {name!r} is {method}: the serving engine batches adapters whose modules are "
                    f"low-rank by row ({capable_text(RowBatchable)}); merge it into a base "
                    f"(petkit merge) or run it with pk.mixed_generate")
            terms = {p: _to(t, "cpu") for p, t in adapter_terms(self.model, name).items()}
        finally:
            detach(self.model, name)
        self.register(name, terms, method)
        return method

    def register(self, name: str, terms: dict[str, RowTerms], method: str) -> None:
        """Keep already-checked terms (path -> RowTerms, on the host) as adapter `name`."""
        if name in self.slots and not self.pins.get(name):  # replaced: the resident copy is stale
            self._evict(name)
        self.host[name], self.methods[name] = terms, method

    def remove(self, name: str) -> None:
        """Forget `name`; a resident copy goes once no running row uses it."""
        self.host.pop(name, None)
        self.methods.pop(name, None)
        if name in self.slots and not self.pins.get(name):
            self._evict(name)

    def names(self) -> list[str]:
        return sorted(self.host)

    # ---- residency (device) ----
    def acquire(self, name: str | None) -> int | None:
        """The slot serving `name` (0: the base), pinned; None when every slot is pinned."""
        if name is None:
            return 0
        if name not in self.slots:
            slot = self._free_slot()
            if slot is None:
                return None
            started = time.perf_counter()
            self.bank.put(slot, {p: _to(t, self.device) for p, t in self.host[name].items()})
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.swap_seconds += time.perf_counter() - started
            self.swaps += 1
            self.slots[name] = slot
        self.slots.move_to_end(name)
        self.pins[name] = self.pins.get(name, 0) + 1
        return self.slots[name]

    def release(self, name: str | None) -> None:
        if name is None:
            return
        self.pins[name] -= 1
        if not self.pins[name] and name not in self.host:  # removed while it was running
            self._evict(name)

    def _free_slot(self) -> int | None:
        used = set(self.slots.values())
        free = [s for s in range(1, self.bank.slots) if s not in used]
        if free:
            return free[0]
        victim = next((n for n in self.slots if not self.pins.get(n)), None)
        return None if victim is None else self._evict(victim)

    def _evict(self, name: str) -> int:
        slot = self.slots.pop(name)
        self.bank.clear(slot)
        return slot


def _to(terms: RowTerms, device: torch.device | str) -> RowTerms:
    return RowTerms(*(t.to(device, copy=True) if isinstance(t, torch.Tensor) else t for t in terms))
