"""Wrappers whose delta is a full (out, in) matrix built from a few small tensors each forward.

LoHa (Hadamard product of two low-rank pairs), LoKr (Kronecker product), HiRA (Hadamard product
with the frozen weight) and SHiRA (a sparse set of entries) all compute

    h = W0 x + mix * dW(θ) x          dW: (out, in), differentiable in the wrapper's tensors θ

so they share one wrapper: a subclass builds `weight_delta()` and the forward, merge and stacking
weight come from here. dW is built in full anyway, so on a plain nn.Linear (no dropout, dW in the
weight's dtype) the forward is one product with W0 + mix dW: a matrix product less, forward and
backward, than base(x) + x dW^T, and bit-equal to the merged layer. Where dW reads the base
weight (HiRA), the merged delta is remembered so that unmerging subtracts exactly what merging
added (recomputing it from the merged weight would not). Also the wrapper of the orthogonal
methods (OFT, HRA), which turn the input before the base, h = W0 (M x), and merge as W0 M.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from petkit.core.delta import DeltaModule, innermost, wrap
from petkit.core.qweight import delta_dtype
from petkit.core.targets import Targets, linear_shape, match_targets, role_targets

from .lowrank import to_base_layout, weight_out_in


def factor_kw(base: nn.Module) -> dict:
    """dtype and device for a delta beside `base` (a quantised base gives its compute dtype)."""
    inner = innermost(base)
    return {"dtype": delta_dtype(inner), "device": inner.weight.device}


def kaiming(*shape: int, kw: dict) -> nn.Parameter:
    """A LoRA-style Kaiming-uniform (a = sqrt 5) parameter of `shape`."""
    p = nn.Parameter(torch.empty(*shape, **kw))
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


def zeros(*shape: int, kw: dict) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, **kw))


def remembered(wrapper: DeltaModule, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The delta for merging, computed while unmerged and given back unchanged while merged.

    For deltas that read the base weight (HiRA, rotations, replaced rows): computed again from the
    merged weight they would differ, and unmerging would not restore the base."""
    if wrapper.merged and "_merged_delta" in wrapper.__dict__:
        return wrapper.__dict__["_merged_delta"]
    delta = compute()
    wrapper.__dict__["_merged_delta"] = delta
    return delta


def plain_base(wrapper: DeltaModule, kind: type[nn.Module]) -> nn.Module | None:
    """The plain `kind` module (exactly that class) under `wrapper` when every wrapper in between
    is disabled, so that `wrapper.base(x)` is that module's own output; else None. A wrapper may
    then fold its delta into the module's weight (one product instead of two) and still compute
    what it computes stacked, bit for bit, whichever adapters are attached but inactive."""
    module = wrapper.base
    while isinstance(module, DeltaModule) and not module.enabled:
        module = module.base
    return module if type(module) is kind else None


def wrap_targets(model: nn.Module, targets: Targets | None, make: type[DeltaModule], name: str,
                 *args: object, role: str = "attn_qv") -> list[str]:
    """Wrap every matched Linear / Conv1D (None: the architecture's `role` layers) with `make`."""
    paths = match_targets(model, targets if targets is not None else role_targets(model, role))
    for path in paths:
        wrap(model, path, make, name, *args)
    return paths



class DroppedDelta:
    """The forward shared by additive linear deltas: `base(x) + delta_output(dropout(x))`, the
    base alone while the adapter is disabled."""

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """The delta's contribution for input `x` (after dropout), mixing weight included."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        if self.dropout is not None:
            x = self.dropout(x)
        return y + self.delta_output(x)

class DenseDelta(DroppedDelta, DeltaModule):
    """h = base(x) + mix * dropout(x) dW^T, with dW = `weight_delta()` (out, in) from the subclass."""

    reads_base: ClassVar[bool] = False  # dW depends on the base weight (remembered while merged)

    def __init__(self, base: nn.Module, adapter_name: str, dropout: float = 0.0) -> None:
        super().__init__(base, adapter_name)
        self.fan_in, self.fan_out, self.transposed = linear_shape(base)
        self.kw = factor_kw(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = 1.0

    def weight_delta(self) -> torch.Tensor:
        """dW in (out, in) layout, differentiable, without the stacking weight."""
        raise NotImplementedError

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_delta().to(x.dtype)) * self.mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = plain_base(self, nn.Linear) if self.enabled and self.dropout is None else None
        own = next(self.parameters(recurse=False), None)  # dW's dtype, without building dW
        if linear is None or own is None or own.dtype != linear.weight.dtype:
            return super().forward(x)  # W0 + dW would round dW to the base's precision
        return F.linear(x, linear.weight + self.weight_delta() * self.mix, linear.bias)

    def base_weight(self) -> torch.Tensor:
        """The frozen W0 (out, in) this delta reads (HiRA), as a detached tensor."""
        return weight_out_in(self).detach()

    def delta_weight(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return to_base_layout(self.weight_delta().detach() * self.mix, self.transposed)

        return remembered(self, compute) if self.reads_base else compute()


class RotatedInput(DeltaModule):
    """h = base(x M^T) for an (in, in) matrix M near the identity (a rotation or reflection).

    A subclass gives `rotate(x)` (x M^T over the last dimension, computed however is cheapest) and
    `rotation()` (M). Mergeable as W' = W M; the merged delta reads the base weight, so it is
    remembered for unmerging. Declares TransformsOutput: a LoRA stacked above must not merge into
    W underneath an unmerged rotation (the rotation would turn its delta too).
    """

    transforms_output = True

    def __init__(self, base: nn.Module, adapter_name: str) -> None:
        super().__init__(base, adapter_name)
        self.fan_in, self.fan_out, self.transposed = linear_shape(base)
        self.kw = factor_kw(base)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotation(self) -> torch.Tensor:
        """M (in, in): rotate(x) == x @ M.T and the merged weight is W M."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(self.rotate(x))

    def delta_weight(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            w = weight_out_in(self).detach()
            return to_base_layout(w @ self.rotation().detach().to(w.dtype) - w, self.transposed)

        return remembered(self, compute)
