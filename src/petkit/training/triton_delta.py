"""petkit's Triton kernels for the low-rank delta (`--runtime.kernels=triton`), after LoRAFusion
(Zhu et al., arXiv 2510.00206): the rank-r products ride inside the base GEMM.

One kernel computes, for a tile of rows of X (M, K) and a tile of columns of the output,

    H = s X Q                        (M, r), stored by the programs of the first column tile
    C = X P + H R                    P (K, N): the frozen weight, Q (K, r), R (r, N): the factors

reading each tile of X once for both products (the r-wide accumulator beside the output's) and
adding the low-rank product in the output's epilogue, into the output's accumulator. The layer's
forward and its input gradient are both this kernel:

    forward    y  = x W^T + s (x A^T) B^T     X = x,  P = W^T, Q = A^T, R = B^T;  H = s x A^T
    backward   dx = dy W + s (dy B) A         X = dy, P = W,   Q = B,   R = A;    H = g = s dy B
               dA = g^T x,  dB = dy^T H       rank-r GEMMs over the tokens (cuBLAS)

so the backward reads dy once for dx and dy B, and no activation is read twice for the delta.
Inputs in bf16 or fp16 (the run's compute dtype), accumulation in fp32; A and B of any float
dtype are cast to the compute dtype for the products and their gradients come back in their own.

`lowrank_linear` is a `torch.autograd.Function` over the custom op `petkit::lowrank_gemm`
(`torch.library.custom_op` with a fake implementation): torch.compile traces around the op, so the
layer sits inside petkit's compiled blocks, and the "selective" / "elementwise" recompute policies
keep its outputs as they keep the matmul it replaces (`activations.save_like_matmul`). Triton is
imported by this module only: the base install never loads it. With `TRITON_INTERPRET=1` set before the first launch the kernel runs on
the CPU through Triton's interpreter (tests); there, bf16 tiles are widened to fp32 before each
product (exact for bf16 products; the interpreter multiplies bf16 bit patterns as integers) and
rounded back to bf16 by hand (its casts truncate), so it computes what the GPU does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from petkit.core.lowrank_rows import interpreting
from petkit.training.activations import save_like_matmul

MAX_RANK = 128  # widest r the kernel's extra accumulator takes; wider: the torch fused path
DTYPES = (torch.bfloat16, torch.float16)
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): the autotuner's choices on a GPU (Hopper-sized)
GPU_TILES = ((128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 3, 8),
             (128, 128, 32, 4, 4), (64, 256, 32, 4, 4), (128, 64, 64, 4, 4),
             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))
INTERPRET_TILE = (32, 32, 32)  # one small tile for the interpreter (no autotuning there)


def _lowrank_gemm_kernel(x_ptr, p_ptr, q_ptr, r_ptr, c_ptr, h_ptr, keep_ptr, M, N, K, R,
                         m_bucket, scale, keep_scale, sxm, sxk, spk, spn, sqk, sqr, srr, srn,
                         scm, scn, shm, shr, skm, skn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                         GIVEN_H: tl.constexpr, MASKED: tl.constexpr, WIDEN: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of C = X P + H R with H = scale X Q (rounded to the output's
    dtype, as the eager path rounds x A^T); the first column of tiles also stores its rows of H.
    GIVEN_H: H is read from h_ptr instead (dropout's forward: H = s dropout(x) A^T); MASKED: the
    low-rank term is kept where keep_ptr's (M, N) mask is true and scaled by keep_scale
    (dropout's input gradient). Programs are grouped GROUP_M row tiles at a time (L2 reuse).
    `m_bucket` (M's power of two) is only the autotuner's key: batches of other token counts
    reuse the tiles chosen."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    # rows and columns past the edge load the first ones again (their results are not stored),
    # so only K needs masks, and none when BLOCK_K divides it
    rm_in, rn_in = rm % M, rn % N
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_in[:, None] * sxm + rk[None, :] * sxk
    p_ptrs = p_ptr + rk[:, None] * spk + rn_in[None, :] * spn
    q_ptrs = q_ptr + rk[:, None] * sqk + rr[None, :] * sqr
    # tl.full, not tl.zeros / tl.cdiv: those are jit helpers, which the interpreter runs only
    # when TRITON_INTERPRET was set before Triton was imported
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    hacc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            p = tl.load(p_ptrs)
        else:
            kk = k0 + rk
            x = tl.load(x_ptrs, mask=kk[None, :] < K, other=0.0)
            p = tl.load(p_ptrs, mask=kk[:, None] < K, other=0.0)
        if WIDEN:
            x, p = x.to(tl.float32), p.to(tl.float32)
        acc = tl.dot(x, p, acc)
        if not GIVEN_H:
            if EVEN_K:
                q = tl.load(q_ptrs, mask=rr[None, :] < R, other=0.0)
            else:
                q = tl.load(q_ptrs, mask=((k0 + rk)[:, None] < K) & (rr[None, :] < R), other=0.0)
            if WIDEN:
                q = q.to(tl.float32)
            hacc = tl.dot(x, q, hacc)
        x_ptrs += BLOCK_K * sxk
        p_ptrs += BLOCK_K * spk
        q_ptrs += BLOCK_K * sqk
    rt = tl.load(r_ptr + rr[:, None] * srr + rn_in[None, :] * srn, mask=rr[:, None] < R, other=0.0)
    if GIVEN_H:
        h = tl.load(h_ptr + rm_in[:, None] * shm + rr[None, :] * shr, mask=rr[None, :] < R,
                    other=0.0)
    elif WIDEN:  # the interpreter's casts truncate: round to nearest even by hand, stay in fp32
        hbits = (hacc * scale).to(tl.uint32, bitcast=True)
        h = ((hbits + 0x7FFF + ((hbits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        h = (hacc * scale).to(h_ptr.dtype.element_ty)
    if WIDEN:
        h, rt = h.to(tl.float32), rt.to(tl.float32)
    if MASKED:
        keep = tl.load(keep_ptr + rm_in[:, None] * skm + rn_in[None, :] * skn)
        acc += tl.where(keep, tl.dot(h, rt) * keep_scale, 0.0)
    else:
        acc = tl.dot(h, rt, acc)
    if WIDEN:
        cbits = acc.to(tl.uint32, bitcast=True)
        acc = ((cbits + 0x7FFF + ((cbits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if not GIVEN_H:
        if pid_n == 0:
            tl.store(h_ptr + rm[:, None] * shm + rr[None, :] * shr, h,
                     mask=(rm[:, None] < M) & (rr[None, :] < R))


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The kernel, jitted (and autotuned on a GPU) on first use, so that the interpreter setting
    in force at the first launch decides."""
    jitted = triton.jit(_lowrank_gemm_kernel)
    if interpret:
        return jitted
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                             num_stages=s, num_warps=w) for m, n, k, s, w in GPU_TILES]
    even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    return triton.autotune(configs, key=["m_bucket", "N", "K", "R"])(even_k(jitted))


def rank_block(r: int) -> int:
    """The padded width of the rank accumulator: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(r))


@torch.library.custom_op("petkit::lowrank_gemm", mutates_args=())
def lowrank_gemm(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                 scale: float, given_h: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None,
                 keep_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X P + H R, H) with H = scale X Q, for X (M, K), P (K, N), Q (K, r), R (r, N), all of
    one dtype; any strides (transposed views need no copy). With `given_h` (M, r), H is that
    (and the second output is empty); with `keep` (M, N, bool), H R counts only where it is
    true, times `keep_scale`."""
    (m, k), n, rank = x.shape, p.shape[1], q.shape[1]
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = torch.empty(0 if given_h is not None else m, rank, dtype=x.dtype, device=x.device)
    if m == 0:
        return c, h
    h_in = given_h if given_h is not None else h
    mask = keep if keep is not None else c  # not read unless MASKED
    interpret = interpreting()
    kernel = _kernel(interpret)
    args = (x, p, q, r, c, h_in, mask, m, n, k, rank, triton.next_power_of_2(m), scale,
            keep_scale, *x.stride(), *p.stride(), *q.stride(), *r.stride(), *c.stride(),
            *h_in.stride(), *mask.stride())
    flags = {"BLOCK_R": rank_block(rank), "GIVEN_H": given_h is not None,
             "MASKED": keep is not None}
    if interpret:
        bm, bn, bk = INTERPRET_TILE
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=k % bk == 0,
                     WIDEN=x.dtype == torch.bfloat16, **flags)
        return c, h

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with torch.cuda.device(x.device):
        kernel[grid](*args, WIDEN=False, **flags)
    return c, h


@lowrank_gemm.register_fake
def _(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, scale: float,
      given_h: torch.Tensor | None = None, keep: torch.Tensor | None = None,
      keep_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    rows = 0 if given_h is not None else x.shape[0]
    return x.new_empty(x.shape[0], p.shape[1]), x.new_empty(rows, q.shape[1])


# the recompute policies keep its outputs where they keep a matmul's: X (M, K) @ P (K, N)
save_like_matmul(torch.ops.petkit.lowrank_gemm.default, (0, 1))


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's mask for `x`: true where an element is kept (probability 1 - p), drawn from
    torch's generator (so a recomputing checkpoint draws the same one)."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)


class TritonLowRank(torch.autograd.Function):
    """y = x W^T + scale (dropout(x) A^T) B^T through `lowrank_gemm`, forward and input gradient
    alike (module docstring). `w` (out, in) is in the compute dtype; `a` (r, in) and `b` (out, r)
    in any float dtype (their gradients come back in it). With `dropout` p > 0, H = s dropout(x)
    A^T is one rank-r GEMM over the dropped-out input before the kernel (which adds H B^T in its
    epilogue), and the input gradient's kernel keeps g A where the mask kept x, over 1 - p."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float, dropout: float = 0.0) -> torch.Tensor:
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f).to(w.dtype)
        ac, bc = a.to(w.dtype), b.to(w.dtype)
        keep, xd = None, x2
        if dropout > 0:  # h from the dropped-out input; the kernel adds h B^T to x W^T
            keep = keep_mask(x2, dropout)
            xd = x2 * keep * (1 / (1 - dropout))
            h = torch.mm(xd, ac.t()).mul_(scale)
            y, _ = lowrank_gemm(x2, w.t(), ac.t(), bc.t(), scale, given_h=h)
        else:
            y, h = lowrank_gemm(x2, w.t(), ac.t(), bc.t(), scale)  # h = s x A^T
        ctx.save_for_backward(xd, h, w, ac, bc, keep)
        ctx.scale, ctx.keep_scale = scale, 1 / (1 - dropout)
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, a.dtype, b.dtype
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd, h, w, ac, bc, keep = ctx.saved_tensors
        out_f, in_f = w.shape
        dy2 = dy.reshape(-1, out_f).to(w.dtype)
        dx = None
        if ctx.needs_input_grad[0]:  # dx = dy W + g A (kept, scaled) and g = s dy B: one kernel
            dx, g = lowrank_gemm(dy2, w, bc, ac, ctx.scale, keep=keep, keep_scale=ctx.keep_scale)
            dx = dx.view(*dy.shape[:-1], in_f).to(ctx.x_dtype)
        else:
            g = torch.mm(dy2, bc).mul_(ctx.scale)
        da = torch.mm(g.t(), xd).to(ctx.a_dtype) if ctx.needs_input_grad[2] else None
        db = torch.mm(dy2.t(), h).to(ctx.b_dtype) if ctx.needs_input_grad[3] else None
        return dx, None, da, db, None, None


def lowrank_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: float, dropout: float = 0.0) -> torch.Tensor:
    """x W^T + scale (dropout(x) A^T) B^T on the Triton kernel (differentiable in x, A, B)."""
    return TritonLowRank.apply(x, w, a, b, scale, dropout)


def unfit(device: torch.device, dtype: torch.dtype, rank: int) -> str | None:
    """Why the kernel cannot take a layer (None: it can): device, compute dtype, rank."""
    if device.type != "cuda" and not interpreting():
        return f"triton kernel on {device.type}"
    if dtype not in DTYPES:
        return f"triton kernel for compute dtype {dtype}"
    if rank > MAX_RANK:
        return f"triton kernel for rank above {MAX_RANK}"
    return None
