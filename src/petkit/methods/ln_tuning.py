"""LayerNorm tuning — Zhao et al., 2023, "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning" (arXiv:2312.11420).

    LayerNorm:  y = (γ + Δγ) ⊙ (x - mean) / std + (β + Δβ)
    RMSNorm:    y = (γ + Δγ) ⊙ x / rms(x)                   (no bias: Llama, Mistral, ...)

Only the normalisation layers' affine parameters train. Computed around the frozen norm as
y = norm(x) + Δγ ⊙ x̂ + Δβ, with x̂ the normalised input (an nn.LayerNorm: one layer_norm with
γ + Δγ, β + Δβ, as cheap as PEFT's copy); Δ = 0 at init (the exact identity).
Touches every LayerNorm and RMSNorm (any module class named `*RMSNorm` with a weight) of the
model by default; `bias=False` leaves LayerNorm biases frozen. Mergeable: Δγ is added to the
weight, Δβ to the bias (a norm without a bias gets no bias delta).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import PeftLayout
from ..core.delta import DeltaModule, canonical_modules, innermost, wrap
from ..core.model import no_targets_error
from ..core.registry import MethodConfig, check_choice, register
from ..core.targets import match_targets
from .family.dense import plain_base


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm with affine weights, or an RMSNorm of any library."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂: the norm's input normalised over the last dimension, before its affine part."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or torch.finfo(x.dtype).eps
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class NormDelta(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, tune_bias: bool) -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        kw = {"dtype": inner.weight.dtype, "device": inner.weight.device}
        self.weight_delta = nn.Parameter(torch.zeros(inner.weight.shape[0], **kw))
        has_bias = isinstance(getattr(inner, "bias", None), torch.Tensor)
        self.bias_delta = nn.Parameter(torch.zeros(inner.weight.shape[0], **kw)) if tune_bias and has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = plain_base(self, nn.LayerNorm) if self.enabled else None
        if norm is not None:  # one norm with γ + Δγ, β + Δβ: as cheap as PEFT's copy
            bias = norm.bias if self.bias_delta is None else norm.bias + self.bias_delta
            return F.layer_norm(x, norm.normalized_shape, norm.weight + self.weight_delta, bias, norm.eps)
        y = self.base(x)
        if not self.enabled:
            return y
        y = y + self.weight_delta * normalised(innermost(self.base), x)
        return y if self.bias_delta is None else y + self.bias_delta

    def delta_weight(self) -> torch.Tensor:
        return self.weight_delta.detach()

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.bias_delta is None else self.bias_delta.detach()


PEFT = PeftLayout(
    "LN_TUNING", {"weight_delta": "ln_tuning_layers.weight", "bias_delta": "ln_tuning_layers.bias"},
    to_peft=lambda c: {},
    from_peft=lambda d: {"bias": True},
    # PEFT trains a whole copy of the norm: its tensors are the new weight and bias, not changes
    to_value=lambda norm, local, t: t + getattr(norm, _BASE[local]).detach(),
    from_value=lambda norm, local, t: t - getattr(norm, _BASE[local]).detach())
_BASE = {"weight_delta": "weight", "bias_delta": "bias"}


@register("ln-tuning", family="selective",
          paper="Zhao et al., 2023, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning")
@dataclass(frozen=True)
class LNTuningConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    suggested_lr: ClassVar[float | None] = 0.005
    bias: bool = True  # also tune LayerNorm biases (RMSNorm has none)

    def validate(self) -> None:
        check_choice("bias", self.bias, (True, False))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets
        if targets is None:
            targets = tuple(p for p, _, m in canonical_modules(model) if p and is_norm(m))
            if not targets:
                raise no_targets_error("ln-tuning (no LayerNorm/RMSNorm layers)", model)
        paths = match_targets(model, targets, accept=is_norm, what="LayerNorm/RMSNorm")
        for path in paths:
            wrap(model, path, NormDelta, name, self.bias)
        return paths
