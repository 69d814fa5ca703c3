"""Rows of many low-rank adapters in ONE forward (Punica / S-LoRA style batched gather-matmul).

Every `RowBatchable` wrapper (LoRA, rsLoRA, DoRA, DyLoRA at its set rank) is, for one row,

    y = gain * W0 x + shift + scale * B A x              (core.capabilities.RowTerms)

A `LowRankBank` keeps, per wrapped module path, the terms of up to `slots` adapters stacked
(A^T [S, in, r], (scale B)^T [S, r, out], gain [S, out], shift [S, out]; ranks zero-padded to the
largest). Slot 0 is the base: all zeros, gain 1, so a row without an adapter gets W0 x exactly.
`rows(slot_ids)` names each row's slot; every base module's forward (wrapped, see below) then adds

    y[i] = gain[s_i] * y[i] + shift[s_i] + (x[i] @ A^T[s_i]) @ (scale B)^T[s_i]      s_i = slot of row i

as two `bmm`s over the whole batch, the base matmul shared. The rows' gathered stacks are built
once per batch composition (a decode loop reuses them). Under `sharing()` a one-row forward
computes sibling paths' shrinks (q/k/v, gate/up: one input) as one product with their joint A. The wrapped forward sits on the innermost
base module, so the model's own wrappers must be disabled while the bank runs (`pk.disabled`).

The wrapper replaces the module's `forward` (an instance attribute, removed by `close`) rather
than registering a forward hook: a hook sends every call of the module through torch's slow
`_call_impl` path, which on a GPU, where a short prefill is bound by Python and kernel launches,
cost about as much again as the two small matmuls themselves.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .capabilities import RowTerms
from .delta import get_canonical, innermost
from .errors import ConfigError


@dataclass
class _Stack:
    """The stacked terms of every slot at one module path."""
    a_t: torch.Tensor                  # [S, in, r]
    b_t: torch.Tensor                  # [S, r, out], scale folded in
    gain: torch.Tensor | None = None   # [S, out]; None while no slot has one
    shift: torch.Tensor | None = None  # [S, out]
    used: set[int] = field(default_factory=set)  # slots with terms here

    def grow_rank(self, rank: int) -> bool:
        """Pad every slot to `rank`; True when the stacks were reallocated."""
        extra = rank - self.a_t.shape[2]
        if extra > 0:
            self.a_t = torch.nn.functional.pad(self.a_t, (0, extra))
            self.b_t = torch.nn.functional.pad(self.b_t, (0, 0, 0, extra))
        return extra > 0

    def put(self, slot: int, terms: RowTerms) -> bool:
        """Write `terms` into `slot`; True when a stack was reallocated (grown or created)."""
        rank = terms.a.shape[0]
        moved = self.grow_rank(rank)
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        self.a_t[slot, :, :rank] = terms.a.t()
        self.b_t[slot, :rank] = (terms.b * terms.scale).t()
        moved |= self._vector("gain", slot, terms.gain, 1.0)
        moved |= self._vector("shift", slot, terms.shift, 0.0)
        self.used.add(slot)
        return moved

    def clear(self, slot: int) -> None:
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        self._vector("gain", slot, None, 1.0)
        self._vector("shift", slot, None, 0.0)
        self.used.discard(slot)

    def _vector(self, kind: str, slot: int, value: torch.Tensor | None, neutral: float) -> bool:
        """Write a per-slot vector; True when its stack was created."""
        stack = getattr(self, kind)
        if stack is None and value is None:
            return False
        created = stack is None
        if created:
            slots, out = self.b_t.shape[0], self.b_t.shape[2]
            stack = self.b_t.new_full((slots, out), neutral)
            setattr(self, kind, stack)
        stack[slot] = neutral if value is None else value.to(stack)
        return created


@dataclass
class _Joint:
    """Sibling paths' A^T side by side, [S, in, r_1 + r_2 + ...]: a copy beside their stacks, kept
    in step by every write, so one GEMM gives every sibling's x @ A^T when they read the same x."""
    paths: tuple[str, ...]
    a_t: torch.Tensor
    cols: dict[str, slice]

    @classmethod
    def of(cls, stacks: Mapping[str, _Stack], paths: tuple[str, ...]) -> "_Joint":
        cols, start = {}, 0
        for path in paths:
            rank = stacks[path].a_t.shape[2]
            cols[path], start = slice(start, start + rank), start + rank
        return cls(paths, torch.cat([stacks[p].a_t for p in paths], dim=2), cols)

    def refresh(self, stacks: Mapping[str, _Stack], slot: int) -> None:
        for path in self.paths:
            self.a_t[slot, :, self.cols[path]] = stacks[path].a_t[slot]


class _Gathered:
    """The stacks indexed by one batch composition: what each row's forward multiplies by.

    One row (a prefill) keeps [1, ...] views of its slot: no copy. With `index` given, rows are
    gathered by it (an index_select: the decode batch's rows, or a captured prefill's one row);
    with `kernel` too, nothing is gathered: the full stacks and the index go to the fused kernel
    (core.lowrank_rows), which reads each row's slot on the device."""

    slots: torch.Tensor | None = None  # set: the full stacks, for the kernel

    def __init__(self, stack: _Stack, key: tuple[int, ...], index: torch.Tensor | None,
                 kernel: bool = False) -> None:
        if kernel and index is not None:
            take = lambda t: t  # noqa: E731
            self.slots = index
        elif index is None:  # one row: a view, no copy
            take = lambda t: t[key[0]: key[0] + 1]  # noqa: E731
        else:
            take = lambda t: t.index_select(0, index)  # noqa: E731
        self.a_t, self.b_t = take(stack.a_t), take(stack.b_t)
        self.gain = None if stack.gain is None else take(stack.gain)[:, None, :]
        self.shift = None if stack.shift is None else take(stack.shift)[:, None, :]
        self.plain = self.gain is None and self.shift is None  # low-rank terms only

    def gather(self) -> "_Gathered":
        """The rows' own terms (an index_select of the full stacks the kernel path keeps)."""
        return _mapped(self, lambda t: t.index_select(0, self.slots), self.plain)  # gain: [S, 1, out]


class LowRankBank:
    """Stacked low-rank terms of up to `slots - 1` adapters (slot 0 = base) at a model's paths."""

    def __init__(self, model: nn.Module, slots: int) -> None:
        if slots < 1:
            raise ConfigError(f"a bank needs at least 1 slot (slot 0: the base), got {slots}")
        self.model, self.slots = model, slots
        self.stacks: dict[str, _Stack] = {}
        self._wrapped: dict[str, tuple[nn.Module, Callable | None]] = {}  # path -> (module, own forward)
        self._key: tuple[int, ...] = ()
        self._slot_index: torch.Tensor | None = None  # set by `indexed_row`
        self._row_kernel = False  # indexed rows through core.lowrank_rows
        self._joints: dict[str, _Joint] | None = None  # path -> its siblings' joint A (`sharing`)
        self._joint_layout = -1  # the layout the joints were built for
        self._shared: dict[int, tuple] | None = None  # joint id -> (weakref to x, x's version, x @ joint A)
        self.layout = 0  # bumped whenever a stack is (re)allocated: captured graphs read addresses
        self._cache: dict[tuple[int, ...], dict[str, _Gathered]] = {}
        self._indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    # ---- contents ----
    def put(self, slot: int, terms: Mapping[str, RowTerms]) -> None:
        """Write an adapter's terms (path -> RowTerms) into `slot`; paths it lacks are zeroed."""
        self._check_slot(slot)
        for path, t in terms.items():
            if self._stack(path, t).put(slot, t):
                self.layout += 1
        for path, stack in self.stacks.items():
            if path not in terms and slot in stack.used:
                stack.clear(slot)
        self._refresh_joints(slot)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for stack in self.stacks.values():
            if slot in stack.used:
                stack.clear(slot)
        self._refresh_joints(slot)

    def _refresh_joints(self, slot: int) -> None:
        """After a write into `slot`: the joints follow in place (their addresses kept for captured
        graphs), or are dropped when a stack moved (built again at the next `sharing`)."""
        self._cache.clear()
        if self._joints is not None and self._joint_layout == self.layout:
            for joint in {id(j): j for j in self._joints.values()}.values():
                joint.refresh(self.stacks, slot)
        else:
            self._joints = None

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.slots:
            raise ConfigError(f"slot must be in [1, {self.slots - 1}] (0 is the base), got {slot}")

    def _stack(self, path: str, terms: RowTerms) -> _Stack:
        if path not in self.stacks:
            module = innermost(get_canonical(self.model, path))
            rank, fan_in = terms.a.shape
            fan_out = terms.b.shape[0]
            kw = {"dtype": terms.b.dtype, "device": terms.b.device}
            self.stacks[path] = _Stack(torch.zeros(self.slots, fan_in, rank, **kw),
                                       torch.zeros(self.slots, rank, fan_out, **kw))
            self._wrapped[path] = (module, module.__dict__.get("forward"))
            module.forward = self._forward(path, module.forward)
            self.layout += 1
        return self.stacks[path]

    def to(self, device: torch.device | str) -> "LowRankBank":
        for stack in self.stacks.values():
            for kind in ("a_t", "b_t", "gain", "shift"):
                value = getattr(stack, kind)
                if value is not None:
                    setattr(stack, kind, value.to(device))
        self._cache.clear()
        self._joints = None
        self.layout += 1
        return self

    def close(self) -> None:
        """Unwrap every module: the model is its plain self again."""
        for module, own in reversed(list(self._wrapped.values())):
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._wrapped.clear()
        self.stacks.clear()
        self._cache.clear()
        self._joints = None
        self.layout += 1

    # ---- rows ----
    def rows(self, slot_ids: Sequence[int]) -> None:
        """Row i of every following forward uses slot `slot_ids[i]` (beams repeat each row)."""
        self._key = tuple(int(s) for s in slot_ids)  # the index tensor is built on first use

    @contextmanager
    def using(self, slot_ids: Sequence[int]) -> Iterator[None]:
        saved = self._key, self._slot_index
        self.rows(slot_ids)
        self._slot_index = None
        try:
            yield
        finally:
            self._key, self._slot_index = saved

    @contextmanager
    def indexed_row(self, slot_index: torch.Tensor, kernel: bool = False) -> Iterator[None]:
        """One row whose slot is read from the device tensor `slot_index` ([1], long) at run time:
        every stacked path gathers its slot with an index_select (or, with `kernel`, the fused
        kernel of core.lowrank_rows reads it: one launch a layer, no gather), so a captured CUDA
        graph serves whichever slot the tensor holds at replay (a slot without terms adds zeros)."""
        saved = self._key, self._slot_index, self._row_kernel
        self._key, self._slot_index, self._row_kernel = (-1,), slot_index, kernel
        try:
            yield
        finally:
            self._key, self._slot_index, self._row_kernel = saved

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """One-row forwards compute the shrink `x @ A^T` of sibling paths (same parent module, same
        input width: q/k/v, gate/up) as ONE product with their joint A, when the siblings are
        called with the same input tensor, each sibling then reading its columns; the expand is
        added in place on the base output (no grad). Fewer, larger kernels: what a one-row prefill
        replayed from a CUDA graph pays for an adapter (serve.prefill_graphs). The joints are
        copies of the siblings' A stacks (the bank's A memory again, for grouped paths), built on
        first use and kept in step by `put` / `clear`."""
        if self._joints is None or self._joint_layout != self.layout:
            self._joints, self._joint_layout = self._build_joints(), self.layout
        saved, self._shared = self._shared, {}
        try:
            yield
        finally:
            self._shared = saved

    def _build_joints(self) -> dict[str, _Joint]:
        groups: dict[tuple, list[str]] = {}
        for path, stack in self.stacks.items():
            key = (path.rpartition(".")[0], stack.a_t.shape[1], stack.a_t.dtype, stack.a_t.device)
            groups.setdefault(key, []).append(path)
        joints = {}
        for paths in groups.values():
            if len(paths) > 1:
                joint = _Joint.of(self.stacks, tuple(paths))
                joints.update(dict.fromkeys(paths, joint))
        return joints

    def _shared_row(self, path: str, g: _Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + (x @ A^T) @ (s B)^T for one row, the A-product taken from the joint's, computed once
        per input tensor (held by a weak reference: a new tensor at a reused address never matches)."""
        joint, slot = self._joints[path], self._key[0]
        hit = self._shared.get(id(joint))
        if hit is None or hit[0]() is not x or hit[1] != x._version:
            hit = self._shared[id(joint)] = (weakref.ref(x), x._version,
                                             torch.bmm(x, joint.a_t[slot: slot + 1]))
        xa = hit[2][..., joint.cols[path]]
        if torch.is_grad_enabled() or y.data_ptr() == x.data_ptr():
            return torch.baddbmm(y, xa, g.b_t)
        return y.baddbmm_(xa, g.b_t)  # the base's fresh output: no copy of it first

    def _gathered(self, path: str) -> _Gathered | None:
        if self._slot_index is not None:  # never cached: a capture must record the gather itself
            return _Gathered(self.stacks[path], self._key, self._slot_index, self._row_kernel)
        per_path = self._cache.get(self._key)
        if per_path is None:
            if len(self._cache) >= 4:  # a decode batch and a few one-row prefills
                self._cache.pop(next(iter(self._cache)))
            per_path = self._cache[self._key] = {}
        if path not in per_path:
            stack = self.stacks[path]
            live = any(s in stack.used for s in self._key)
            index = None if len(self._key) == 1 else self._index(stack.a_t.device)
            per_path[path] = _Gathered(stack, self._key, index) if live else None
        return per_path[path]

    def _index(self, device: torch.device) -> torch.Tensor:
        index = self._indices.get((self._key, device))
        if index is None:
            if len(self._indices) >= 8:
                self._indices.pop(next(iter(self._indices)))
            index = self._indices[(self._key, device)] = torch.tensor(
                self._key, dtype=torch.long, device=device)
        return index

    def _forward(self, path: str, plain: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            y = plain(x, *args, **kwargs)
            g = self._gathered(path) if self._key else None
            if g is None:
                return y
            if self._shared is not None and self._slot_index is None and path in self._joints \
                    and _one_row(g, x, y):  # (an indexed row's slot is only known on the device)
                return self._shared_row(path, g, x, y)
            return _apply(g, x, y)
        return forward


def _apply(g: _Gathered, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if g.slots is not None:
        if g.plain and x.dim() == 3 == y.dim() and x.shape[0] == g.slots.shape[0] \
                and x.dtype == g.a_t.dtype == y.dtype and g.a_t.shape[2] <= 128:
            from .lowrank_rows import lowrank_rows  # triton: only where a caller asked for the kernel

            return lowrank_rows(x, y, g.a_t, g.b_t, g.slots)
        g = g.gather()
    rows = g.a_t.shape[0]
    if g.plain and x.dtype == g.a_t.dtype == y.dtype:
        if x.dim() == 3 == y.dim() and x.shape[0] == rows:  # a decode step or a prefill: two calls
            return torch.baddbmm(y, torch.bmm(x, g.a_t), g.b_t)
        if rows == 1:  # one row in another layout ([tokens, in], beams of one row, ...)
            return y + torch.matmul(torch.matmul(x, g.a_t[0]), g.b_t[0])
    if x.shape[0] != rows:  # generate's beams / return sequences repeat each row
        if x.shape[0] % rows:
            raise ConfigError(f"the batch has {x.shape[0]} rows but {rows} row adapters were given")
        g = _repeat(g, x.shape[0] // rows)
    shape = y.shape
    x3, y3 = x.reshape(x.shape[0], -1, x.shape[-1]), y.reshape(y.shape[0], -1, y.shape[-1])
    a_t, b_t = g.a_t, g.b_t
    if a_t.dtype != x3.dtype:
        a_t = a_t.to(x3.dtype)
    if b_t.dtype != y3.dtype:
        b_t = b_t.to(y3.dtype)
    if g.gain is not None:
        y3 = y3 * g.gain.to(y3.dtype)
    if g.shift is not None:
        y3 = y3 + g.shift.to(y3.dtype)
    xa = torch.bmm(x3, a_t)
    return torch.baddbmm(y3, xa if xa.dtype == y3.dtype else xa.to(y3.dtype), b_t).view(shape)


def _one_row(g: _Gathered, x: torch.Tensor, y: torch.Tensor) -> bool:
    """One row of low-rank terms only, 3-D, one dtype: the product the joint A can share."""
    return g.plain and g.slots is None and x.dim() == 3 == y.dim() and x.shape[0] == 1 == g.a_t.shape[0] \
        and x.dtype == g.a_t.dtype == y.dtype


def _repeat(g: _Gathered, times: int) -> _Gathered:
    return _mapped(g, lambda t: t.repeat_interleave(times, dim=0), False)


def _mapped(g: _Gathered, take: Callable[[torch.Tensor], torch.Tensor], plain: bool) -> _Gathered:
    """A _Gathered whose terms are `take` of g's (rows selected or repeated)."""
    out = object.__new__(_Gathered)
    out.plain = plain
    for kind in ("a_t", "b_t", "gain", "shift"):
        value = getattr(g, kind)
        setattr(out, kind, None if value is None else take(value))
    return out
