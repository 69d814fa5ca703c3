"""A trainable bias delta on any module whose output's last dimension is its width.

Shared by BitFit and LoRA's `bias="all"|"lora_only"`: `y = base(x) + db`, db = 0 at init.
Merging adds db to the base's bias, creating one where the base had none.
"""
from __future__ import annotations

import torch
from torch import nn

from petkit.core.delta import DeltaModule, innermost
from petkit.core.qweight import delta_dtype


def output_width(module: nn.Module) -> int:
    inner = innermost(module)
    if isinstance(inner, nn.Linear):
        return inner.out_features
    bias = getattr(inner, "bias", None)
    if isinstance(bias, torch.Tensor):
        return bias.shape[-1]
    weight = getattr(inner, "weight", None)
    if isinstance(weight, torch.Tensor):  # Conv1D (in, out), norms (width,)
        return weight.shape[-1]
    raise TypeError(f"cannot tell the output width of {type(inner).__name__}")


class BiasDelta(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str) -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        ref = getattr(inner, "weight", None)
        self.bias_delta = nn.Parameter(torch.zeros(output_width(base), dtype=delta_dtype(inner) if ref is not None else None,
                                                   device=ref.device if ref is not None else None))
        if not isinstance(getattr(inner, "bias", None), torch.Tensor):
            self.notes.append("added zero bias (base had none)")

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        return out + self.bias_delta if self.enabled else out

    def delta_bias(self) -> torch.Tensor:
        return self.bias_delta.detach()
