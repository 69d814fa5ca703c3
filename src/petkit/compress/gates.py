"""Training-time pruning masks: a gate on the input of o_proj (KV groups) and down_proj (channels).

Zeroing the o_proj input of a KV group's query heads removes that group's whole effect (its q,
k, v rows then feed nothing); zeroing a down_proj input channel removes that MLP unit. So one
mask per layer and kind is the exact training-time stand-in for the slicing done at the end.
The gate is a wrapper stacked on top of whatever LoRA sits there, named `<adapter>.prune`.
It declares the StepHooked capability so the standard training loop drives the schedule.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from petkit.core.delta import DeltaModule


class PruneGate(DeltaModule):
    """Multiplies its base's input by a 0/1 mask over input features."""

    def __init__(self, base: nn.Module, adapter_name: str, width: int, unit: int,
                 on_step: Callable[[int, int], None]) -> None:
        super().__init__(base, adapter_name)
        self.unit = unit  # input features per prunable structure (head group width, or 1)
        self.register_buffer("mask", torch.ones(width))
        self._on_step = on_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x * self.mask.to(x.dtype))

    def on_train_step(self, step: int, total_steps: int) -> None:
        self._on_step(step, total_steps)

    def set_pruned(self, pruned: torch.Tensor) -> None:
        """Zero the features of the pruned structures (indices of groups / channels)."""
        mask = torch.ones(self.mask.numel() // self.unit, device=self.mask.device)
        mask[pruned.to(self.mask.device)] = 0
        self.mask.copy_(mask.repeat_interleave(self.unit))

    def kept(self) -> torch.Tensor:
        """Indices of the structures still in."""
        return torch.nonzero(self.mask.view(-1, self.unit)[:, 0] > 0).flatten().cpu()
