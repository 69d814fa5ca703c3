"""DyLoRA — Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models
using Dynamic Search-Free Low-Rank Adaptation" (EACL 2023, arXiv:2210.07558).

One LoRA pair of the largest rank r trains every rank b in [min_rank, r] at once: each training
forward samples b uniformly (one b for the whole model) and uses only the first b rows of A and
columns of B:

    h = W0 x + (alpha / b) * B[:, :b] A[:b, :] x          B = 0 at init (identity)

update="last" is the paper's "frozen" mode (only row/column b is updated, rows < b are detached);
"all" updates every row up to b. After training, `pk.set_rank(model, b)` picks the rank used for
evaluation, merging and saving (stored as `eval_rank` in the adapter file) — no retraining.
Touches Linear / GPT-2 Conv1D layers (default: attention query and value). Mergeable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import LowRank, RankRange, RankSettable, RowBatchable, RowTerms, Weighted
from ..core.delta import DeltaModule, iter_deltas, wrap
from .family.lowrank import check_lora_fields, factor_pair, frozen_prefix, linear_shape, to_base_layout, weight_out_in
from ..core.model import add_detach_hook
from ..core.registry import MethodConfig, check_choice, check_range, register
from ..core.targets import match_targets, role_targets


class DyLoraLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, min_rank: int, alpha: float,
                 dropout: float, update: str, eval_rank: int) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, self.transposed = linear_shape(base)
        self.lora_A, self.lora_B = factor_pair(r, fan_in, fan_out, weight_out_in(self))
        self.alpha, self.min_rank, self.max_rank = alpha, min_rank, r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.update = update
        self.rank = eval_rank  # used outside training
        self.train_rank = r  # set for each training forward by the root hook
        self.mix = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        learning = self.training and self.lora_A.requires_grad  # a frozen DyLoRA keeps its rank
        b = self.train_rank if learning else self.rank
        frozen = b - 1 if learning and self.update == "last" else 0  # "last": only rank b learns
        a, bm = frozen_prefix(self.lora_A, self.lora_B, frozen, b)
        if self.dropout is not None:
            x = self.dropout(x)
        return y + F.linear(F.linear(x, a), bm) * (self.alpha / b * self.mix)

    def set_rank(self, rank: int) -> None:
        self.rank = rank

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A[: self.rank], self.lora_B[:, : self.rank], self.alpha / self.rank

    def row_terms(self) -> RowTerms:
        a, bm, scale = self.lowrank()
        return RowTerms(a.detach(), bm.detach(), scale)

    def delta_weight(self) -> torch.Tensor:
        a, bm, scale = self.lowrank()
        return to_base_layout((bm @ a).detach() * (scale * self.mix), self.transposed)


def _rank_sampler(wrappers: list[DyLoraLinear], low: int, high: int) -> Any:
    """Root forward pre-hook: in training mode, draw one rank b ~ U{low..high} for all layers."""

    def hook(module: nn.Module, args: Any) -> None:
        if module.training:
            b = int(torch.randint(low, high + 1, (1,)))
            for w in wrappers:
                w.train_rank = b

    return hook


@register("dylora", family="reparameterised",
          paper="Valipour et al., 2023, DyLoRA: Parameter-Efficient Tuning of Pre-trained Models "
                "using Dynamic Search-Free Low-Rank Adaptation")
@dataclass(frozen=True)
class DyLoraConfig(MethodConfig):
    capabilities: ClassVar[tuple[type, ...]] = (Weighted, LowRank, RowBatchable, RankSettable, RankRange)
    r: int = 8  # the largest rank trained
    min_rank: int = 1
    alpha: float = 16.0
    dropout: float = 0.0
    update: str = "all"  # all | last (the paper's frozen mode)
    eval_rank: int | None = None  # rank outside training; None = r

    def validate(self) -> None:
        check_lora_fields(self)
        check_range("min_rank", self.min_rank, 1, self.r, kind=int)
        check_choice("update", self.update, ("all", "last"))
        if self.eval_rank is not None:
            check_range("eval_rank", self.eval_rank, self.min_rank, self.r, kind=int)

    def rank_range(self) -> tuple[int, int]:
        return self.min_rank, self.r

    def at_rank(self, rank: int) -> "DyLoraConfig":
        """This config evaluated at `rank` (checked against [min_rank, r])."""
        return dataclasses.replace(self, eval_rank=rank)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, "attn_qv")
        paths = match_targets(model, targets)
        rank = self.eval_rank or self.r
        for path in paths:
            wrap(model, path, DyLoraLinear, name, self.r, self.min_rank, self.alpha, self.dropout,
                 self.update, rank)
        wrappers = [w for _, w in iter_deltas(model) if isinstance(w, DyLoraLinear) and w.adapter_name == name]
        handle = model.register_forward_pre_hook(_rank_sampler(wrappers, self.min_rank, self.r))
        add_detach_hook(model, name, handle.remove)
        return paths
