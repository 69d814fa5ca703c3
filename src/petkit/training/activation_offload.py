"""Activation offload: what autograd saves inside chosen transformer blocks waits for the
backward pass in host memory, moved by asynchronous copies that overlap the compute.

`ActivationOffload(model, fraction)` picks k = ceil(fraction * n) of the model's n blocks, evenly
spread from block 0 (the top block only when fraction is 1: its backward comes first, with
nothing to hide its copy behind). `installed()` marks which block is running for the run;
`saving()` is the context of one forward (torch's `saved_tensors_hooks`):

- forward: the storage of each tensor saved while a chosen block runs is copied into pinned host
  memory on an "offload" stream that waits for the compute stream, once per block however many
  saved tensors view it (eager ops share inputs; q, k and v can split one output); the device
  copy is released as soon as its copy has run (`record_stream`), so a block's activations leave
  the card while the next block computes. Parameters, buffers and tensor subclasses stay where
  they are.
- backward: the first saved tensor the backward pass reads starts fetching the highest chosen
  block back on a "fetch" stream; reading a chosen block's tensors waits for its fetch and starts
  the next chosen block below it, so one block's activations travel while the block above
  computes its backward.

With `compile_scope="blocks"` the hooks see what each block's compiled graph keeps for its
backward, after the partitioner's recompute choices and fp8 quantization (`activations.py`):
those bytes are what moves. A whole-model graph saves everything in one piece, at the end of the
forward, where no copy can overlap anything, so compile needs compile_scope="blocks"
(`RuntimeConfig` checks). Under checkpointing in eager mode a block saves only its inputs (the
rest is recomputed), so little moves. A model without a block stack is one group (fraction 1
only). Tensors already in host memory (a CPU device) are left alone; `copy_on_cpu` copies them
anyway, which the tests use to run the same paths without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torch.multiprocessing.reductions import StorageWeakRef

from petkit.core.blocks import layer_paths
from petkit.core.errors import ConfigError


class _Saved:
    """One offloaded storage: its block, its bytes in host memory and (fetched) on the device.
    Autograd holds `_View`s of it: several saved tensors can be views of one storage."""

    __slots__ = ("group", "host", "device", "target", "ready", "packs", "left", "__weakref__")

    def __init__(self, group: int, host: torch.Tensor, target: torch.device) -> None:
        self.group, self.host, self.target = group, host, target
        self.device: torch.Tensor | None = None  # uint8, the storage's bytes
        self.ready: Any = None  # a CUDA event: the fetch has run
        self.packs = 1  # how many saved tensors view it
        self.left = 0  # reads of the device copy before it is released


class _View:
    """A saved tensor: its storage's `_Saved` and where in it the tensor lies."""

    __slots__ = ("saved", "dtype", "offset", "size", "stride")

    def __init__(self, saved: _Saved, tensor: torch.Tensor) -> None:
        self.saved, self.dtype, self.offset = saved, tensor.dtype, tensor.storage_offset()
        self.size, self.stride = tensor.size(), tensor.stride()

    def on(self, storage: torch.Tensor) -> torch.Tensor:
        """This view of `storage` (a uint8 tensor of the storage's bytes)."""
        out = torch.empty(0, dtype=self.dtype, device=storage.device)
        return out.set_(storage.untyped_storage(), self.offset, self.size, self.stride)


def chosen_blocks(n: int, fraction: float) -> list[int]:
    """k = ceil(fraction * n) block indices, evenly spread from 0 (all n when fraction is 1)."""
    k = max(1, math.ceil(fraction * n - 1e-9))
    return sorted({j * n // k for j in range(k)})


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of `storage`'s bytes."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class ActivationOffload:
    """Saved activations of a fraction of `model`'s blocks in host memory (module docstring)."""

    def __init__(self, model: nn.Module, fraction: float = 1.0, *, copy_on_cpu: bool = False
                 ) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"activation offload fraction must be in (0, 1], got {fraction!r}")
        paths = layer_paths(model)
        if not paths and fraction < 1:
            raise ConfigError("RuntimeConfig.activation_offload_fraction below 1 picks blocks; "
                              "this model has no stack of transformer blocks")
        self.model, self.copy_on_cpu = model, copy_on_cpu
        self.blocks = [model.get_submodule(p) for p in paths]
        self.chosen = set(chosen_blocks(len(self.blocks), fraction)) if self.blocks else {0}
        self.current: int | None = None if self.blocks else 0
        self.groups: dict[int, list[weakref.ref[_Saved]]] = {}
        self.pending: list[int] = []  # groups with tensors in host memory, highest first
        self.ahead: int | None = None  # the group fetched before its backward asked for it
        self.moved_bytes = 0  # bytes copied to host memory by the last forward
        self.moved_groups: set[int] = set()
        self._kept: set[int] = set()
        self._seen: dict[tuple, tuple[StorageWeakRef, weakref.ref[_Saved]]] = {}
        self._streams: dict[torch.device, tuple[Any, Any]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Each chosen block's call marks it as running (around its compiled call, if any: a
        mark inside a compiled graph would be traced, not run)."""
        previous = [vars(block).get("_compiled_call_impl") for block in self.blocks]
        for index, block in enumerate(self.blocks):
            if index in self.chosen:
                inner = previous[index] or block._call_impl
                block._compiled_call_impl = self._marking(index, inner)
        try:
            yield
        finally:
            for block, before in zip(self.blocks, previous):
                block._compiled_call_impl = before

    def _marking(self, index: int, inner: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            outer, self.current = self.current, index
            try:
                return inner(*args, **kwargs)
            finally:
                self.current = outer

        return call

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """One forward pass whose chosen blocks' saved tensors go to host memory."""
        self.groups, self.pending, self.ahead = {}, [], None
        self.moved_bytes, self.moved_groups = 0, set()
        self._kept = {t.untyped_storage().data_ptr()
                      for t in (*self.model.parameters(), *self.model.buffers())}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._seen = {}
        self.pending = sorted(self.groups, reverse=True)

    def _stream_pair(self, device: torch.device) -> tuple[Any, Any]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> Any:
        group = self.current
        on_cuda = tensor.device.type == "cuda"
        if group is None or group not in self.chosen or not (on_cuda or self.copy_on_cpu) \
                or type(tensor) is not torch.Tensor or tensor.layout != torch.strided \
                or tensor.untyped_storage().data_ptr() in self._kept:
            return tensor  # parameters, buffers, subclasses, other blocks: left where they are
        storage = tensor.untyped_storage()
        key = (group, storage.data_ptr())  # per block: what every block reads moves with each
        known = self._seen.get(key)
        saved = known[1]() if known is not None and not known[0].expired() else None
        if saved is not None:  # another view of a storage already copied (eager ops share
            saved.packs += 1  # their inputs, q / k / v split one output): no second copy
            return _View(saved, tensor)
        device = _bytes(storage)
        host = torch.empty(device.shape, dtype=torch.uint8, pin_memory=on_cuda)
        if on_cuda:
            offload, _ = self._stream_pair(tensor.device)
            offload.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(offload):
                host.copy_(device, non_blocking=True)
            tensor.record_stream(offload)  # its memory is reused only after the copy has run
        else:
            host.copy_(device)
        saved = _Saved(group, host, tensor.device)
        self.groups.setdefault(group, []).append(weakref.ref(saved))
        self._seen[key] = (StorageWeakRef(storage), weakref.ref(saved))
        self.moved_bytes += host.numel()
        self.moved_groups.add(group)
        return _View(saved, tensor)

    def _unpack(self, view: Any) -> torch.Tensor:
        if not isinstance(view, _View):  # the backward has begun: fetch the top group early
            if self.ahead is None and self.pending:
                self._fetch(self.pending[0])
            return view
        saved = view.saved
        if saved.device is None:
            self._fetch(saved.group)
        if saved.device is None:  # saved by an earlier forward whose backward comes only now
            self._fetch_one(saved)
        if self.ahead == saved.group:
            self.ahead = None
        if self.ahead is None and self.pending:  # the next chosen block below, one ahead
            self._fetch(self.pending[0])
        tensor, saved.left = view.on(saved.device), saved.left - 1
        if saved.left <= 0:
            saved.device = None  # the last read: the backward owns it now
        if saved.ready is not None:  # wait for its fetch; free it only after the backward's use
            compute = torch.cuda.current_stream(tensor.device)
            compute.wait_event(saved.ready)
            tensor.record_stream(compute)
        return tensor

    def _fetch(self, group: int) -> None:
        """Start copying `group`'s live storages back to their device."""
        if group in self.pending:
            self.pending.remove(group)
            self.ahead = group
        for ref in self.groups.get(group, []):
            saved = ref()
            if saved is not None and saved.device is None:
                self._fetch_one(saved)

    def _fetch_one(self, saved: _Saved) -> None:
        if saved.target.type == "cuda":
            offload, fetch = self._stream_pair(saved.target)
            fetch.wait_stream(offload)  # the host copy is complete
            with torch.cuda.stream(fetch):  # allocated from the fetch stream's memory
                device = torch.empty_like(saved.host, device=saved.target)
                device.copy_(saved.host, non_blocking=True)
                saved.ready = torch.cuda.Event()
                saved.ready.record(fetch)
        else:
            device = saved.host.clone()
        saved.device, saved.left = device, saved.packs
