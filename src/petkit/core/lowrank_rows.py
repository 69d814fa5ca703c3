"""One Triton kernel for the bank's per-row low-rank term (Punica's gather-matmul, shrink and expand fused):

    out[i] = y[i] + (x[i] @ A^T[s_i]) @ (scale B)^T[s_i]        s_i = slots[i], read on the device

for x [rows, T, in], y / out [rows, T, out] and the bank's stacks A^T [S, in, r], (scale B)^T
[S, r, out]. The slot is loaded inside the kernel, so a captured CUDA graph serves whichever slot
the index tensor holds at replay with no gather, and each adapted layer costs one launch instead of
`bmm` + `baddbmm` (serve.prefill_graphs uses it; core.batched_lowrank dispatches to it only when
asked, since an eager Triton launch costs more CPU time than the two cuBLAS calls it replaces).

Numerics follow the eager path: the shrink accumulates in float32 and is rounded to the operands'
dtype (as `bmm` returns it), the expand accumulates in float32 and adds y before the one rounding
(as `baddbmm` does). float32 operands use IEEE products, not TF32. Needs `triton` (imported by this
module only); with `TRITON_INTERPRET=1` it runs in Triton's CPU interpreter (the tests do).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl


def _rows_kernel(x_ptr, y_ptr, o_ptr, a_ptr, b_ptr, s_ptr, T, N, K, R,
                 sxb, sxt, sxk, syb, syt, syn, sob, sot, son, sas, sak, sar, sbs, sbr, sbn,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    row = tl.program_id(0)
    rt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    slot = tl.load(s_ptr + row)
    a_base = a_ptr + slot * sas
    xa = tl.full((BLOCK_T, BLOCK_R), 0.0, tl.float32)  # tl.full: tl.zeros is a jit helper the interpreter refuses
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + row * sxb + rt[:, None] * sxt + kk[None, :] * sxk,
                    mask=(rt[:, None] < T) & (kk[None, :] < K), other=0.0)
        a = tl.load(a_base + kk[:, None] * sak + rr[None, :] * sar,
                    mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
        if WIDEN:  # the interpreter has no bfloat16 products
            x, a = x.to(tl.float32), a.to(tl.float32)
        if IEEE:
            xa += tl.dot(x, a, input_precision="ieee")
        else:
            xa += tl.dot(x, a)
    b = tl.load(b_ptr + slot * sbs + rr[:, None] * sbr + rn[None, :] * sbn,
                mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if WIDEN:  # the interpreter's casts truncate: round to nearest even by hand, stay in fp32
        bits = xa.to(tl.uint32, bitcast=True)
        h = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        b = b.to(tl.float32)
    else:
        h = xa.to(b.dtype)  # the shrink's output in the operands' dtype, as bmm returns it
    if IEEE:
        delta = tl.dot(h, b, input_precision="ieee")
    else:
        delta = tl.dot(h, b)
    keep = (rt[:, None] < T) & (rn[None, :] < N)
    y = tl.load(y_ptr + row * syb + rt[:, None] * syt + rn[None, :] * syn, mask=keep, other=0.0)
    out = y.to(tl.float32) + delta
    if WIDEN:
        bits = out.to(tl.uint32, bitcast=True)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    out = out.to(y.dtype)
    tl.store(o_ptr + row * sob + rt[:, None] * sot + rn[None, :] * son, out, mask=keep)


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The kernel, jitted on first use: the interpreter setting in force then decides."""
    return triton.jit(_rows_kernel)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


def lowrank_rows(x: torch.Tensor, y: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """y + per-row (x @ A^T[slot]) @ B^T[slot]: x [rows, T, in], y [rows, T, out], a_t [S, in, r],
    b_t [S, r, out] (one dtype), slots [rows] (long, on x's device). Returns a new tensor."""
    rows, tokens, fan_in = x.shape
    fan_out, rank = y.shape[2], a_t.shape[2]
    out = torch.empty_like(y)
    if rows == 0 or tokens == 0:
        return out.copy_(y)
    interpret = interpreting()
    block_t = 32 if interpret else min(64, max(16, triton.next_power_of_2(tokens)))
    block_n = 32 if interpret else 128
    block_k = 32 if interpret else 64
    grid = (rows, triton.cdiv(tokens, block_t), triton.cdiv(fan_out, block_n))
    _kernel(interpret)[grid](x, y, out, a_t, b_t, slots, tokens, fan_out, fan_in, rank,
                       *x.stride(), *y.stride(), *out.stride(), *a_t.stride(), *b_t.stride(),
                       BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                       BLOCK_R=max(16, triton.next_power_of_2(rank)), IEEE=x.dtype == torch.float32,
                       WIDEN=interpret and x.dtype == torch.bfloat16)
    return out
