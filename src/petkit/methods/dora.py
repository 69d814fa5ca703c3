"""DoRA — Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).

The weight is split into a magnitude vector m (one entry per output row) and a direction that
LoRA adapts:

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          m = ||W0||_c at init, B = 0  (identity)
    h  = W' x + b  =  W0 x + b + [(m/n - 1) * W0 x + (m/n) * s B A x],   n = ||W0 + s B A||_c

||.||_c is the L2 norm of each output row over the input dimension. As the paper suggests
(section 4.3) n is treated as a constant in the backward pass (detached), which keeps training
memory near LoRA's. Touches Linear / GPT-2 Conv1D layers (default: attention query and value).
Mergeable: the merged weight is W' above; the delta merged is remembered so unmerge is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import PeftLayout, MergesOwnDeltas, RowBatchable, RowTerms, Weighted
from ..core.delta import DeltaModule, innermost, wrap
from .family.lowrank import check_lora_fields, factor_pair, linear_shape, to_base_layout, weight_out_in
from .family.peft_fields import lora_layout
from ..core.registry import MethodConfig, check_choice, register
from ..core.targets import match_targets, role_targets


class DoraLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, alpha: float, dropout: float,
                 rslora: bool) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, self.transposed = linear_shape(base)
        w0 = weight_out_in(self)
        self.lora_A, self.lora_B = factor_pair(r, fan_in, fan_out, w0)
        self.magnitude = nn.Parameter(torch.linalg.norm(w0.detach(), dim=1))
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = 1.0
        self._merged_delta: torch.Tensor | None = None

    def _magnitude_scale(self, w0: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + s B A||_c, the norm detached (DoRA section 4.3)."""
        lora_w = (self.lora_B @ self.lora_A).detach()
        norm = torch.linalg.norm(w0 + self.scaling * lora_w, dim=1).detach()
        return self.magnitude / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        w0 = weight_out_in(self).to(x.dtype)
        scale = self._magnitude_scale(w0)
        if self.dropout is not None and self.training:
            x = self.dropout(x)
            w0x = F.linear(x, w0)
        elif self.base is innermost(self.base):  # reuse the base output: W0 x = y - b
            bias = getattr(self.base, "bias", None)
            w0x = y if bias is None else y - bias
        else:  # stacked on another wrapper: its delta is not part of W0 x
            w0x = F.linear(x, w0)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return y + ((scale - 1) * w0x + scale * lora) * self.mix

    def row_terms(self) -> RowTerms:
        """m/n * (W0 x + s B A x) + b  =  g * (W0 x + b) + (1 - g) b + s (g B) A x,  g = m/n."""
        with torch.no_grad():
            gain = self._magnitude_scale(weight_out_in(self))
            bias = getattr(innermost(self.base), "bias", None)
            shift = None if bias is None else (1 - gain) * bias
            return RowTerms(self.lora_A.detach(), gain[:, None] * self.lora_B, self.scaling, gain, shift)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            w0 = weight_out_in(self)
            direction = w0 + self.scaling * (self.lora_B @ self.lora_A)
            merged = self._magnitude_scale(w0)[:, None] * direction
            return to_base_layout((merged - w0) * self.mix, self.transposed)

    def merge_deltas(self) -> dict[str, torch.Tensor]:
        """The delta depends on W0, which merging changes: unmerge subtracts what merge added."""
        if not self.merged or self._merged_delta is None:
            self._merged_delta = self.delta_weight()
        return {"weight": self._merged_delta}


@register("dora", family="reparameterised",
          paper="Liu et al., 2024, DoRA: Weight-Decomposed Low-Rank Adaptation")
@dataclass(frozen=True)
class DoraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = lora_layout(dora=True)
    capabilities: ClassVar[tuple[type, ...]] = (Weighted, MergesOwnDeltas, RowBatchable)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def validate(self) -> None:
        check_lora_fields(self)
        check_choice("rslora", self.rslora, (True, False))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, "attn_qv")
        paths = match_targets(model, targets)
        for path in paths:
            wrap(model, path, DoraLinear, name, self.r, self.alpha, self.dropout, self.rslora)
        return paths
