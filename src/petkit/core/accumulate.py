"""The low-rank B-product added into the base output in place, for compiled graphs.

A LoRA-family layer ends with y = y0 + s h B^T, where y0 = base(x) (N, out) and h = A x (N, r).
Out of place (`torch.addmm(y0, h, B^T)`) cuBLAS accumulates into a fresh buffer, so inductor
first copies y0 into it: a device-to-device copy of every adapted layer's output, about 3% of a
1.1B LoRA step on an H100 (docs/training-gpu.md). In place (`y0.addmm_(h, B^T)`) the GEMM reads
and writes y0 and nothing is copied.

Inductor keeps an in-place op in place only when it is opaque and declares what it mutates:
`petkit::addmm_into` is a custom op that mutates `y`, and `AccumulateLowRank` (an autograd
Function with `mark_dirty`) gives it the gradients

    dy0 = dy,   dh = s dy B,   dB = s dy^T h.

y0 is mutated, so the tensor the base layer returned is gone: that is safe in a compiled graph,
whose functional form keeps every value a later use needs, but not in eager selective
checkpointing, which caches a saved matmul's output and refuses one mutated since. So the
in-place path runs only while torch.compile traces (`in_place_ok`); eager code adds out of place.

It is on by default (`IN_PLACE`): measured on an H100 (torch 2.11, 2026-12-07), together with
`training.shared_input`, the 1.1B LoRA step's median process went from 69,663 to 76,906 tok/s at
the same peak memory (docs/training-gpu.md). `benchmarks/gpu_train.py`'s `-copy` cases turn it
off.
"""
from __future__ import annotations

from typing import Any

import torch

IN_PLACE = True  # measured faster on an H100 (docs/training-gpu.md); False: out of place


@torch.library.custom_op("petkit::addmm_into", mutates_args=("y",))
def addmm_into(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """y += scale * h B^T in place, for y (..., out) contiguous, h (..., r), B (out, r)."""
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)


@addmm_into.register_fake
def _(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    return None


class AccumulateLowRank(torch.autograd.Function):
    """y0 + scale h B^T, written into y0 (module docstring)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        addmm_into(y, h, b, scale)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, b)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = torch.mm(dy2, b).mul_(ctx.scale).view(h.shape) if ctx.needs_input_grad[1] else None
        db = torch.mm(dy2.t(), h.reshape(-1, h.shape[-1])).mul_(ctx.scale) if ctx.needs_input_grad[2] else None
        return dy, dh, db, None


def in_place_ok(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `y` may take the B-product in place: under torch.compile, y and h of one dtype
    and B of it too, or cast to it as autocast would (fp32 factors under bf16 autocast), y
    contiguous and not a leaf that autograd tracks."""
    return (IN_PLACE and torch.compiler.is_compiling() and y.dtype == h.dtype and y.is_contiguous()
            and not (y.is_leaf and y.requires_grad)
            and (b.dtype == y.dtype or torch.is_autocast_enabled(y.device.type)))


def accumulate_lowrank(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale h B^T, in y's own memory (see `in_place_ok` for when); B in y's dtype, as
    autocast casts it for an addmm (its gradient comes back in B's own dtype)."""
    return AccumulateLowRank.apply(y, h, b.to(y.dtype), scale)
