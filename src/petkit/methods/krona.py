"""KronA — Edalati et al., 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter"
(arXiv:2212.10650).

The weight change is a Kronecker product of two small factors:

    dW = s * (A (x) B)        A: (a_out, a_in),  B: (out / a_out, in / a_in),  B = 0 at init
    h  = W0 x + s * vec_rowmajor(A X B^T),   X = x reshaped to (a_in, in / a_in)

The forward uses the identity (A (x) B) x = vec(A X B^T) (row-major vec), so the (out, in) delta
is never built: two small matmuls per token. `a_out` / `a_in` set A's shape (None: the divisor
of the layer's width nearest its square root). Touches Linear / GPT-2 Conv1D layers (default:
attention query and value). Mergeable (merge builds A (x) B once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import Weighted
from ..core.delta import DeltaModule, get_canonical, wrap
from ..core.errors import ConfigError
from .family.lowrank import linear_shape, to_base_layout, weight_out_in
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import match_targets, role_targets


def sqrt_divisor(n: int) -> int:
    """The largest divisor of n that is <= sqrt(n)."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def factor_size(width: int, wanted: int | None, field: str, path: str) -> int:
    if wanted is None:
        return sqrt_divisor(width)
    if width % wanted:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        raise ConfigError(f"{field}={wanted} does not divide the width {width} of {path!r}; "
                          f"allowed: {divisors[:12]}{'...' if len(divisors) > 12 else ''}")
    return wanted


class KronaLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, a_out: int, a_in: int, scale: float) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, self.transposed = linear_shape(base)
        like = weight_out_in(self)
        kw = {"dtype": like.dtype, "device": like.device}
        self.krona_A = nn.Parameter(torch.empty(a_out, a_in, **kw))
        nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))
        self.krona_B = nn.Parameter(torch.zeros(fan_out // a_out, fan_in // a_in, **kw))
        self.scale = scale
        self.mix = 1.0

    def kron_apply(self, x: torch.Tensor) -> torch.Tensor:
        """(A (x) B) x for x (..., in), as A X B^T on x viewed (..., a_in, b_in).

        Plain 2-D products (F.linear) rather than broadcast matmuls, whose kernel — and so the
        last bit of the result — can depend on whether A requires grad.
        """
        a, b = self.krona_A, self.krona_B
        xm = x.reshape(*x.shape[:-1], a.shape[1], b.shape[1])
        xbt = F.linear(xm, b)  # X B^T: (..., a_in, b_out)
        y = F.linear(xbt.transpose(-1, -2).contiguous(), a)  # (A X B^T)^T: (..., b_out, a_out)
        return y.transpose(-1, -2).reshape(*x.shape[:-1], a.shape[0] * b.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.kron_apply(x) * (self.scale * self.mix)

    def delta_weight(self) -> torch.Tensor:
        dw = torch.kron(self.krona_A, self.krona_B).detach() * (self.scale * self.mix)
        return to_base_layout(dw, self.transposed)


@register("krona", family="reparameterised",
          paper="Edalati et al., 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter")
@dataclass(frozen=True)
class KronaConfig(MethodConfig):
    capabilities: ClassVar[tuple[type, ...]] = (Weighted,)
    suggested_lr: ClassVar[float | None] = 0.01
    a_out: int | None = None  # rows of A (must divide each target's output width)
    a_in: int | None = None  # columns of A (must divide each target's input width)
    scale: float = 1.0

    def validate(self) -> None:
        for field in ("a_out", "a_in"):
            if getattr(self, field) is not None:
                check_range(field, getattr(self, field), 1, kind=int)
        check_range("scale", self.scale, 0, low_open=True)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, "attn_qv")
        paths = match_targets(model, targets)
        sizes = []
        for path in paths:  # check every layer before wrapping any
            fan_in, fan_out, _ = linear_shape(get_canonical(model, path))
            sizes.append((factor_size(fan_out, self.a_out, "a_out", path),
                          factor_size(fan_in, self.a_in, "a_in", path)))
        for path, (a_out, a_in) in zip(paths, sizes):
            wrap(model, path, KronaLinear, name, a_out, a_in, self.scale)
        return paths
