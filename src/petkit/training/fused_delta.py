"""petkit's fused low-rank delta: the base product and the A-product from one read of the input.

A LoRA-family layer computes y = x W^T + s (x A^T) B^T. Eagerly that is three GEMMs in the
forward, and the rank-r product `x A^T` reads the whole activation x a second time. Here the frozen
W (out, in) and a copy of A (r, in) in W's dtype are rows of one (out + r, in) matrix [W; A] (W's
parameter becomes a view of its first `out` rows), so

    forward    [y0 | h] = x [W; A]^T          one GEMM: base product and h = x A^T
               y = y0 + s h B^T               one addmm into the base output
    backward   g  = s dy B                    (N, r)
               dx = dy (W + s B A)            one GEMM over N tokens; when the merged weight
                  = [dy | g] [W; A]           costs more than N rows, dy beside g instead
               dB = s dy^T h,  dA = g^T x     rank-r products of tensors already at hand

`FusedLowRank` is a `torch.autograd.Function` of plain torch ops (dynamo traces it: it composes
with torch.compile and the checkpointing policies see its matmuls). The copy of A is refreshed
from the trained A before every forward of the model (a forward pre-hook), so optimiser updates
reach it; its gradient goes to the real A, whatever its dtype (fp32 by default).

A layer takes the fused path when its wrapper says its forward is exactly base + s B A x
(`FusableLowRank.fused_terms()`: LoRA with no frozen offset; no active dropout, on this path),
its base is a plain `nn.Linear` whose weight is an ordinary tensor on a device in `FUSED_DEVICES`,
and the weight's dtype is the run's compute dtype (bf16 under bf16 precision, else fp32). Any
other layer, and any call under another autocast dtype or while the adapter is disabled or
merged, runs the wrapper's own forward. `fused_deltas` yields a `FusedReport` saying which ran.

With `kernel="triton"` a fused layer runs petkit's Triton kernel instead (`triton_delta`: the
A-product inside the base GEMM, the B-product in its epilogue, the same for the input gradient;
LoRA's dropout included) when Triton is installed and the kernel takes the layer (a CUDA weight,
bf16 or fp16 compute, r <= `triton_delta.MAX_RANK`); a fused layer it does not take runs the
torch path above (or, with dropout active, its own forward), and the report says which layers
ran which and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from petkit.core.capabilities import FusableLowRank
from petkit.core.delta import DeltaModule, iter_deltas

FUSED_DEVICES = ("cuda",)  # device types the fused path is installed on (elsewhere: eager)
# The forward's base and A-products as one GEMM over [W; A] (out + r output columns: one read of
# x, but a last column of output tiles r wide), or as two GEMMs; the backward is the same.
# `benchmarks/gpu_train.py` measures both (`...-fused` and `...-fused2`).
ONE_GEMM_FORWARD = True
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DELTA_KERNELS = ("torch", "triton")  # what computes a fused layer: the torch function, or Triton


class FusedLowRank(torch.autograd.Function):
    """y = x W^T + scale (x A^T) B^T, with `wa` = [W; A] (out + r, in) in the compute dtype;
    `a` is the trained A (its gradient's dtype), `b` the trained B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wa: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float, one_gemm: bool = True) -> torch.Tensor:
        out_f = wa.shape[0] - a.shape[0]
        x2 = x.reshape(-1, x.shape[-1]).to(wa.dtype)
        bc = b.to(wa.dtype)
        if one_gemm:  # base product and A-product from one read of x
            ya = torch.mm(x2, wa.t())
            h = ya[:, out_f:].contiguous()  # (N, r): kept for dB; ya itself is freed below
            y = torch.addmm(ya[:, :out_f], h, bc.t(), alpha=scale)
        else:  # two GEMMs (no odd-sized output tiles); out of place: a recompute policy may
            h = torch.mm(x2, wa[out_f:].t())  # keep the base product (tests/test_fused_delta.py)
            y = torch.addmm(torch.mm(x2, wa[:out_f].t()), h, bc.t(), alpha=scale)
        ctx.save_for_backward(x2, h, wa, bc)
        ctx.scale, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scale, x.dtype, a.dtype, b.dtype
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, wa, bc = ctx.saved_tensors
        out_f, in_f = bc.shape[0], wa.shape[1]
        dy2 = dy.reshape(-1, out_f).to(wa.dtype)
        g = torch.mm(dy2, bc).mul_(ctx.scale)  # (N, r): the gradient of h
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(dy2, g, wa, bc, ctx.scale)
            dx = dx.view(*dy.shape[:-1], in_f).to(ctx.x_dtype)
        da = torch.mm(g.t(), x2).to(ctx.a_dtype) if ctx.needs_input_grad[2] else None
        db = torch.mm(dy2.t(), h).mul_(ctx.scale).to(ctx.b_dtype) \
            if ctx.needs_input_grad[3] else None
        return dx, None, da, db, None, None


def _input_grad(dy: torch.Tensor, g: torch.Tensor, wa: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """dx = dy W + g A as one GEMM, by whichever way moves the fewest extra elements:
    the merged (out, in) weight W + s B A (2 out in), dy copied beside g (2 N out), or a second
    pass over dx (2 N in)."""
    tokens, out_f, in_f = dy.shape[0], b.shape[0], wa.shape[1]
    merged, beside, twice = out_f * in_f, tokens * out_f, tokens * in_f
    if merged <= min(beside, twice):  # dy (W + s B A): g A is already s dy B A
        return torch.mm(dy, torch.addmm(wa[:out_f], b, wa[out_f:], alpha=scale))
    if beside <= twice:
        return torch.mm(torch.cat([dy, g], dim=1), wa)
    return torch.mm(dy, wa[:out_f]).addmm_(g, wa[out_f:])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in for input `x`: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _unfusable(wrapper: DeltaModule, device_types: tuple[str, ...],
               dtype: torch.dtype) -> str | None:
    """Why `wrapper` cannot take the fused path (None: it can)."""
    base = wrapper.base
    if not isinstance(wrapper, FusableLowRank) or wrapper.fused_terms() is None:
        return "method, dropout or init"
    if type(base) is not nn.Linear:
        return "base is not a plain nn.Linear"
    weight = base.weight
    if type(weight.data) is not torch.Tensor or weight.device.type not in device_types:
        return f"weight on {weight.device.type}" if type(weight.data) is torch.Tensor \
            else "sharded weight"
    if dtype not in FUSED_DTYPES:
        return f"compute dtype {dtype}"
    if weight.dtype != dtype:
        return f"weight dtype {weight.dtype} is not the compute dtype {dtype}"
    return None


class _FusedLayer:
    """One wrapper on the fused path: its [W; A] matrix and the forward that uses it, or (with
    `triton`, the `triton_delta` module) the Triton kernel over W and the trained A, B."""

    def __init__(self, wrapper: DeltaModule, triton: ModuleType | None = None) -> None:
        a = wrapper.fused_terms().a
        weight = wrapper.base.weight
        self.wrapper, self.weight, self.own, self.triton = wrapper, weight, wrapper.forward, triton
        self.instance_forward = vars(wrapper).get("forward")  # one set by other code, put back
        self.out_f = weight.shape[0]
        if triton is not None:  # the kernel reads W and A where they are: no [W; A] copy
            return
        self.wa = torch.empty(self.out_f + a.shape[0], weight.shape[1], dtype=weight.dtype,
                              device=weight.device)
        with torch.no_grad():
            self.wa[:self.out_f].copy_(weight)
            self.wa[self.out_f:].copy_(a)
        weight.data = self.wa[:self.out_f]  # W now lives in [W; A]: no second copy
        self.a_rows = self.wa[self.out_f:]
        self.seen = a._version  # the version of A the copy holds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wrapper = self.wrapper
        terms = wrapper.fused_terms() if wrapper.enabled else None
        if terms is None or compute_dtype(x) != self.weight.dtype \
                or (terms.dropout and self.triton is None):  # dropout: the Triton kernel only
            return self.own(x)
        a, b, scale, shift, dropout = terms
        if self.triton is not None:
            y = self.triton.lowrank_linear(x, self.weight, a, b, scale, dropout)
        else:
            y = FusedLowRank.apply(x, self.wa, a, b, scale, ONE_GEMM_FORWARD)
        bias = wrapper.base.bias
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y if shift is None else y + shift

    def remove(self) -> None:
        """The wrapper's own forward, and W in a tensor of its own again."""
        if self.instance_forward is None:
            del self.wrapper.forward
        else:
            self.wrapper.forward = self.instance_forward
        if self.triton is None:
            self.weight.data = self.wa[:self.out_f].clone()


@dataclass
class FusedReport:
    """Which layers took the fused path (and the Triton kernel), and why the others did not."""

    fused: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    kernel: str = "torch"
    triton: int = 0  # fused layers on the Triton kernel
    torch_only: dict[str, int] = field(default_factory=dict)  # fused layers it did not take, why

    def note(self) -> str:
        """One line for the run's log."""
        total = self.fused + sum(self.skipped.values())
        line = f"fused delta on {self.fused} of {total} delta layers"
        if self.kernel == "triton":
            torch_why = "".join(f"; torch on {n}: {why}"
                                for why, n in sorted(self.torch_only.items()))
            line += f" (triton kernel on {self.triton}{torch_why})"
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return line + (f" (eager: {why})" if why else "")


def _triton_module() -> ModuleType | None:
    """`triton_delta`, imported now, or None when Triton is not installed."""
    if find_spec("triton") is None:
        return None
    from petkit.training import triton_delta

    return triton_delta


def _layer(wrapper: DeltaModule, triton: ModuleType | None, dtype: torch.dtype,
           report: FusedReport) -> _FusedLayer | str:
    """The fused layer for `wrapper`: on the Triton kernel when asked and it takes the layer,
    else on the torch function; while dropout is active, which only the kernel fuses, the
    reason it keeps its own forward instead."""
    reason = None
    if report.kernel == "triton":
        reason = "triton is not installed" if triton is None else triton.unfit(
            wrapper.base.weight.device, dtype, wrapper.fused_terms().a.shape[0])
        if reason is None:
            report.triton += 1
            return _FusedLayer(wrapper, triton)
    if wrapper.fused_terms().dropout:
        return "method, dropout or init" if reason is None else f"dropout, {reason}"
    if reason is not None:
        report.torch_only[reason] = report.torch_only.get(reason, 0) + 1
    return _FusedLayer(wrapper)


def _refresh(layers: list[_FusedLayer], stepped: bool) -> None:
    """Copy each trained A that changed into its [W; A] matrix: every A after an optimiser step
    (`stepped`: torch's fused AdamW updates in place WITHOUT bumping version counters), else
    those whose version moved (a zeroth-order perturbation, a load). An unchanged A is not
    copied: [W; A] is saved for the backward of a forward still pending (two forwards, one
    backward), and a copy would bump its version."""
    rows, trained = [], []
    for layer in layers:
        terms = layer.wrapper.fused_terms()
        if terms is not None and (stepped or terms.a._version != layer.seen):
            rows.append(layer.a_rows)
            trained.append(terms.a)
            layer.seen = terms.a._version
    if rows:
        with torch.no_grad():
            torch._foreach_copy_(rows, trained)


@contextlib.contextmanager
def fused_deltas(model: nn.Module, dtype: torch.dtype, device_types: tuple[str, ...] | None = None,
                 kernel: str = "torch") -> Iterator[FusedReport]:
    """Inside the context, every eligible delta wrapper of `model` (module docstring) runs the
    fused forward for compute dtype `dtype` (on `device_types`, default FUSED_DEVICES), computed
    by `kernel` (DELTA_KERNELS) where it takes the layer; the model is as before afterwards."""
    report, layers = FusedReport(kernel=kernel), []
    triton = _triton_module() if kernel == "triton" else None
    device_types = device_types or FUSED_DEVICES
    for _, wrapper in iter_deltas(model):
        reason = _unfusable(wrapper, device_types, dtype)
        layer = reason if reason is not None else _layer(wrapper, triton, dtype, report)
        if isinstance(layer, str):
            report.skipped[layer] = report.skipped.get(layer, 0) + 1
            continue
        wrapper.forward = layer.forward
        layers.append(layer)
    report.fused = len(layers)
    copied = [layer for layer in layers if layer.triton is None]

    steps = [0, 0]  # optimiser steps seen by the hook, and by the last refresh

    def stepped(optimizer: Any, args: Any, kwargs: Any) -> None:
        steps[0] += 1

    @torch._dynamo.disable  # reads version counters: runs eagerly, before a whole-model graph
    def refresh(module: nn.Module, args: Any) -> None:
        _refresh(copied, steps[0] != steps[1])
        steps[1] = steps[0]

    hooks = [model.register_forward_pre_hook(refresh),
             register_optimizer_step_post_hook(stepped)] if copied else []
    try:
        yield report
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            layer.remove()
