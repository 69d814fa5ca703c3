"""Shared pieces of the LoRA family: factor creation and the low-rank protocol.

Every LoRA-family wrapper holds factors A (r, in) and B (out, r) around a Linear / GPT-2 Conv1D
and adds `scale * B A x` (times its stacking weight `mix`). Wrappers whose delta is exactly
that expose `lowrank() -> (A, B, scale)` (without `mix`); code that combines adapters (weighted
merges, COLA links) reads factors only through it — never by parameter names.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from petkit.core.accumulate import accumulate_lowrank, in_place_ok
from petkit.core.delta import DeltaModule, innermost
from petkit.core.registry import check_range
from petkit.core.capabilities import Factors, LowRank, lowrank_factors  # noqa: F401 - re-exported for methods
from petkit.core.qweight import delta_dtype, dense_weight
from petkit.core.targets import linear_dims, linear_shape  # noqa: F401


def factor_pair(rows: int, fan_in: int, fan_out: int, like: torch.Tensor | nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's init: A Kaiming-uniform (rows, in), B zeros (out, rows) — so B A = 0.

    `like` is a dense weight or the base layer (a quantised one gives its compute dtype)."""
    if isinstance(like, nn.Module):
        kw = {"dtype": delta_dtype(like), "device": like.weight.device}
    else:
        kw = {"dtype": like.dtype, "device": like.device}
    a = nn.Parameter(torch.empty(rows, fan_in, **kw))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, nn.Parameter(torch.zeros(fan_out, rows, **kw))


def add_lowrank(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """`y + scale * h B^T` as one `addmm` over the flattened leading dimensions.

    `h` is the low-rank activation A x (..., r), `b` the factor B (out, r). Unlike
    `y + F.linear(h, b) * scale` this forms no (..., out) temporaries for the product and its
    scaling, and the backward has no (..., out) multiply. Where `y` and `h` differ in dtype (no
    autocast; a base that returns another dtype) it falls back to that expression, which promotes."""
    if y.dtype != h.dtype:
        return y + torch.nn.functional.linear(h, b) * scale
    if in_place_ok(y, h, b):  # compiled: into y's own memory, no copy of it (core.accumulate)
        return accumulate_lowrank(y, h, b, scale)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
    return out.view(y.shape)


def weight_out_in(wrapper: DeltaModule) -> torch.Tensor:
    """The innermost base weight in (out, in) layout (a view; Conv1D stores (in, out)).

    A quantised base gives a dequantised temporary in its compute dtype (core.qweight)."""
    inner = innermost(wrapper.base)
    _, _, transposed = linear_dims(inner)
    weight = dense_weight(inner)
    return weight.T if transposed else weight


def to_base_layout(delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A (out, in) delta in the layout of the base weight."""
    return delta.T if transposed else delta


def frozen_prefix(a: torch.Tensor, b: torch.Tensor, frozen: int, used: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `used` ranks of (A, B) with the first `frozen` of them cut from the gradient."""
    a, b = a[:used], b[:, :used]
    if frozen <= 0:
        return a, b
    return (torch.cat([a[:frozen].detach(), a[frozen:]], dim=0),
            torch.cat([b[:, :frozen].detach(), b[:, frozen:]], dim=1))


def check_lora_fields(config: object) -> None:
    """Validate the fields every LoRA-family config has: r >= 1, alpha > 0, dropout in [0, 0.999]."""
    check_range("r", getattr(config, "r"), 1, kind=int)
    check_range("alpha", getattr(config, "alpha"), 0, low_open=True)
    check_range("dropout", getattr(config, "dropout"), 0.0, 0.999)
