"""SHiRA — Bhardwaj et al., 2024, "Sparse High Rank Adapters" (NeurIPS 2024, arXiv:2406.13175).

    h  = W0 x + dW x,      dW = scatter(w, M)       w: (r (out + in),), 0 at init (identity)

Only a fixed sparse set M of the weight's entries trains — as many as a rank-r LoRA has numbers —
so dW is high-rank and merging it changes 1-2% of the weight (fast adapter switching). M is
PEFT's random mask: the first r (out + in) entries of a permutation of the (out, in) positions
drawn from a generator seeded with `random_seed` (None: torch's default generator seed, as in
PEFT), in row-major order; the mask is rebuilt from the config, never stored. Touches Linear /
GPT-2 Conv1D layers (default: attention query and value). Mergeable. Parameter name follows
PEFT's `ShiraConfig` (`shira_weight`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import Weighted
from ..core.errors import ConfigError
from ..core.capabilities import PeftLayout
from .family.peft_fields import need, refuse
from ..core.registry import MethodConfig, check_range, register
from .family.dense import DenseDelta, wrap_targets, zeros


def random_positions(rows: int, cols: int, count: int, seed: int | None) -> torch.Tensor:
    """Flat indices (row-major, sorted) of `count` random entries of a (rows, cols) matrix."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    return torch.randperm(rows * cols, generator=gen)[:count].sort().values


class ShiraLinear(DenseDelta):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, seed: int | None) -> None:
        super().__init__(base, adapter_name)
        count = r * (self.fan_in + self.fan_out)
        if count > self.fan_in * self.fan_out:
            raise ConfigError(f"--method.r={r} asks for {count} trained entries, more than the "
                              f"{self.fan_out}x{self.fan_in} weight holds; lower r")
        self.register_buffer("positions", random_positions(self.fan_out, self.fan_in, count, seed), persistent=False)
        self.shira_weight = zeros(count, kw=self.kw)

    def weight_delta(self) -> torch.Tensor:
        flat = self.shira_weight.new_zeros(self.fan_out * self.fan_in)
        return flat.index_put((self.positions,), self.shira_weight).view(self.fan_out, self.fan_in)


PEFT = PeftLayout(
    "SHIRA", {"shira_weight": "shira_weight"},
    to_peft=lambda c: {"r": c.r, "mask_type": "random", "random_seed": c.random_seed, "init_weights": True},
    from_peft=lambda d: _from_peft(d), fan_in_fan_out=True,
    skip=lambda key, _: key.endswith(".shira_indices"))  # PEFT's copy of the mask: rebuilt from random_seed


def _from_peft(d: dict) -> dict:
    refuse(d, "mask_type", "random", "only PEFT's random mask is rebuilt from the config (a custom mask_fn "
                                     "is code, not in the file)")
    return {"r": int(need(d, "r")), "random_seed": d.get("random_seed")}

@register("shira", family="reparameterised", paper="Bhardwaj et al., 2024, Sparse High Rank Adapters")
@dataclass(frozen=True)
class ShiraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Weighted,)
    r: int = 32  # trained entries per layer: r (out + in), as many as a rank-r LoRA
    random_seed: int | None = None  # the mask's generator seed (None: torch's default, as PEFT)

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        if self.random_seed is not None:
            check_range("random_seed", self.random_seed, 0, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, ShiraLinear, name, self.r, self.random_seed)
