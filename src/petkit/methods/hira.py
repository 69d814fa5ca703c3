"""HiRA — Huang et al., 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large
Language Models" (ICLR 2025).

    h  = W0 x + dW x,      dW = W0 ⊙ (B A)        A: (r, in), B: (out, r), B = 0 at init

The Hadamard product with the frozen weight makes dW high-rank (up to rank(W0) * r) at LoRA's
parameter count; the update of each entry is proportional to the entry itself. Touches Linear /
GPT-2 Conv1D layers (default: attention query and value). Mergeable (the delta reads W0, so the
merged delta is remembered for unmerging). Parameter names follow PEFT's `HiraConfig`
(`hira_A`, `hira_B`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import Weighted
from ..core.delta import innermost
from ..core.capabilities import PeftLayout
from .family.peft_fields import need
from ..core.registry import MethodConfig, check_range, register
from .family.dense import DenseDelta, wrap_targets
from .family.lowrank import factor_pair


class HiraLinear(DenseDelta):
    reads_base = True

    def __init__(self, base: nn.Module, adapter_name: str, r: int, dropout: float) -> None:
        super().__init__(base, adapter_name, dropout)
        self.hira_A, self.hira_B = factor_pair(r, self.fan_in, self.fan_out, innermost(base))

    def weight_delta(self) -> torch.Tensor:
        return self.base_weight() * (self.hira_B @ self.hira_A)


PEFT = PeftLayout(
    "HIRA", {"hira_A": "hira_A", "hira_B": "hira_B"},
    to_peft=lambda c: {"r": c.r, "hira_dropout": c.dropout, "init_weights": True},
    from_peft=lambda d: {"r": int(need(d, "r")), "dropout": float(d.get("hira_dropout", 0.0))},
    fan_in_fan_out=True)

@register("hira", family="reparameterised",
          paper="Huang et al., 2025, HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models")
@dataclass(frozen=True)
class HiraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Weighted,)
    r: int = 8
    dropout: float = 0.0

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_range("dropout", self.dropout, 0.0, 0.999)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, HiraLinear, name, self.r, self.dropout)
