"""VeRA — Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024,
arXiv:2310.11454).

    h = W0 x + Λb B Λd A x         A: (r, in), B: (out, r) random and frozen, shared by all layers
                                   Λd = diag(d) (r,), Λb = diag(b) (out,): the only trained numbers
    init: b = 0 (identity), d = d_initial

A and B are drawn once per adapter (Kaiming-uniform from a generator seeded with
`projection_prng_key`) at the largest (out, in) among the targets; each layer uses their top-left
block, so a layer trains out + r numbers whatever the rank. They are rebuilt from the key, never
trained; the adapter file holds b and d only. Touches Linear / GPT-2 Conv1D layers (default:
attention query and value). Mergeable. Names, draws and init follow PEFT's `VeraConfig`
(`vera_lambda_b`, `vera_lambda_d`, `vera_A`, `vera_B`), so adapters exchange.
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
from ..core.capabilities import PeftLayout
from .family.peft_fields import need
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import linear_shape, match_targets, role_targets
from .family.dense import DroppedDelta, factor_kw
from .family.lowrank import to_base_layout


def kaiming_draw(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt 2, fan = columns) from `gen` (PEFT's `_kaiming_init`)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def shared_projections(r: int, fan_in: int, fan_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen A (r, fan_in) then B (fan_out, r), drawn in that order from one generator."""
    gen = torch.Generator().manual_seed(key)
    return kaiming_draw((r, fan_in), gen), kaiming_draw((fan_out, r), gen)


class VeraLinear(DroppedDelta, DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, proj_a: torch.Tensor, proj_b: torch.Tensor,
                 dropout: float, d_initial: float) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, self.transposed = linear_shape(base)
        kw = factor_kw(base)
        self.register_buffer("vera_A", proj_a[:, :fan_in].to(**kw), persistent=False)
        self.register_buffer("vera_B", proj_b[:fan_out].to(**kw), persistent=False)
        self.vera_lambda_b = nn.Parameter(torch.zeros(fan_out, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((proj_a.shape[0],), d_initial, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = 1.0

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(F.linear(x, self.vera_A) * self.vera_lambda_d, self.vera_B)
        return h * (self.vera_lambda_b * self.mix)

    def delta_weight(self) -> torch.Tensor:
        b = self.vera_lambda_b.detach()[:, None] * self.vera_B
        dw = (b * self.vera_lambda_d.detach()) @ self.vera_A * self.mix
        return to_base_layout(dw, self.transposed)


PEFT = PeftLayout(
    "VERA", {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"},
    to_peft=lambda c: {"r": c.r, "vera_dropout": c.dropout, "d_initial": c.d_initial,
                       "projection_prng_key": c.projection_prng_key, "save_projection": False, "bias": "none",
                       "init_weights": True},
    from_peft=lambda d: {"r": int(need(d, "r")), "dropout": float(d.get("vera_dropout", 0.0)),
                         "d_initial": float(d.get("d_initial", 0.1)),
                         "projection_prng_key": int(d.get("projection_prng_key", 0))},
    fan_in_fan_out=True,
    skip=lambda key, _: key.startswith(("base_model.vera_A", "base_model.vera_B")))  # rebuilt from the key

@register("vera", family="reparameterised",
          paper="Kopiczko et al., 2024, VeRA: Vector-based Random Matrix Adaptation")
@dataclass(frozen=True)
class VeraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Weighted,)
    suggested_lr: ClassVar[float | None] = 0.01
    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_range("dropout", self.dropout, 0.0, 0.999)
        check_range("d_initial", self.d_initial, 0.0)
        check_range("projection_prng_key", self.projection_prng_key, 0, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        paths = match_targets(model, self.targets if self.targets is not None else role_targets(model, "attn_qv"))
        shapes = [linear_shape(get_canonical(model, p)) for p in paths]
        proj_a, proj_b = shared_projections(self.r, max(s[0] for s in shapes), max(s[1] for s in shapes),
                                            self.projection_prng_key)
        for path in paths:
            wrap(model, path, VeraLinear, name, proj_a, proj_b, self.dropout, self.d_initial)
        return paths
