"""LoHa — Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning" (arXiv:2108.06098), as packaged by LyCORIS / PEFT.

    h  = W0 x + dW x,      dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)
    W1a, W2a: (out, r)     W1b, W2b: (r, in)           W2b = 0 at init (identity)

The Hadamard product of two rank-r matrices has rank up to r², so LoHa reaches a high-rank dW
with 2 r (out + in) numbers. The forward builds dW (out, in) each step (family/dense.py).
Touches Linear / GPT-2 Conv1D layers (default: attention query and value). Mergeable.
Parameter names and init follow PEFT's `LoHaConfig` (`hada_w1_a`, ...), so adapters exchange.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import Weighted
from ..core.capabilities import PeftLayout
from .family.peft_fields import need
from ..core.registry import MethodConfig, check_range, register
from .family.dense import DenseDelta, kaiming, wrap_targets, zeros


class LohaLinear(DenseDelta):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, alpha: float) -> None:
        super().__init__(base, adapter_name)
        kw = self.kw
        self.hada_w1_a, self.hada_w1_b = kaiming(self.fan_out, r, kw=kw), kaiming(r, self.fan_in, kw=kw)
        self.hada_w2_a, self.hada_w2_b = kaiming(self.fan_out, r, kw=kw), zeros(r, self.fan_in, kw=kw)
        self.scale = alpha / r

    def weight_delta(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale


PEFT = PeftLayout(
    "LOHA", {k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    to_peft=lambda c: {"r": c.r, "alpha": c.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                       "use_effective_conv2d": False, "init_weights": True},
    from_peft=lambda d: {"r": int(need(d, "r")), "alpha": float(need(d, "alpha"))})

@register("loha", family="reparameterised",
          paper="Hyeon-Woo et al., 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient "
                "Federated Learning")
@dataclass(frozen=True)
class LohaConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Weighted,)
    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_range("alpha", self.alpha, 0, low_open=True)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, LohaLinear, name, self.r, self.alpha)
