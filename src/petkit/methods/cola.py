"""Chain of LoRA (COLA) — Xia et al., 2024, "Chain of LoRA: Efficient Fine-tuning of Language
Models via Residual Learning" (arXiv:2401.04151).

Residual learning by a chain of L LoRA links of rank r. Link j trains for `link_steps` steps on
top of the base plus every earlier link, which is then frozen ("merged") and a fresh link starts:

    h = W0 x + (alpha / r) * sum_{i <= j} B_i A_i x        B_i = 0 at init (identity)

petkit keeps the links beside the base rather than adding them into W0: the frozen links are
cut from the gradient and restored after every optimiser step, which is the same function as
merging them (W0 + sum_{i<j} s B_i A_i is what link j learns on) but keeps the base untouched,
so disable, save/load and unmerge stay exact. The training loop advances the chain through the
wrapper's `on_train_step` hook (petkit.training.step_hooks). The result saves as one adapter (the
summed delta: a rank L*r LoRA, `pk.save_adapter`) or as its links (`pk.save_links`: one plain
LoRA folder per link; stacking them gives the same delta). Mergeable.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import LowRank, StepHooked, Weighted
from ..core.adapter_merge import lora_from_factors
from ..core.delta import DeltaModule, iter_deltas, wrap
from ..core.errors import ConfigError
from ..core.io import save_adapter
from .family.lowrank import check_lora_fields, factor_pair, frozen_prefix, linear_shape, to_base_layout, weight_out_in
from ..core.model import keep_activation
from ..core.model import TrainableCopy, adapters, detach
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import match_targets, role_targets


class ColaLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, links: int, link_steps: int | None,
                 alpha: float, dropout: float) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, self.transposed = linear_shape(base)
        # link i owns rows i*r:(i+1)*r of A and the same columns of B
        self.lora_A, self.lora_B = factor_pair(links * r, fan_in, fan_out, weight_out_in(self))
        self.r, self.links, self.link_steps = r, links, link_steps
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = 1.0
        self.link = 0  # the link being trained
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # links < self.link

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        if self.training and self.lora_A.requires_grad:  # earlier links frozen, later not started
            a, b = frozen_prefix(self.lora_A, self.lora_B, self.link * self.r, (self.link + 1) * self.r)
        else:
            a, b = self.lora_A, self.lora_B
        if self.dropout is not None:
            x = self.dropout(x)
        return y + F.linear(F.linear(x, a), b) * (self.scaling * self.mix)

    def on_train_step(self, step: int, total_steps: int) -> None:
        """After `step` optimiser steps: undo any update of frozen links; move on at a link's end."""
        per_link = self.link_steps or math.ceil(total_steps / self.links)
        link = min(step // per_link, self.links - 1)
        n = self.link * self.r
        with torch.no_grad():
            if self._frozen is not None:
                self.lora_A[:n].copy_(self._frozen[0])
                self.lora_B[:, :n].copy_(self._frozen[1])
            if self._frozen is None or link != self.link:
                self.link, n = link, link * self.r
                self._frozen = (self.lora_A[:n].clone(), self.lora_B[:, :n].clone())

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scaling

    def delta_weight(self) -> torch.Tensor:
        return to_base_layout((self.lora_B @ self.lora_A).detach() * (self.scaling * self.mix), self.transposed)


@register("cola", family="reparameterised",
          paper="Xia et al., 2024, Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning")
@dataclass(frozen=True)
class ColaConfig(MethodConfig):
    capabilities: ClassVar[tuple[type, ...]] = (Weighted, LowRank, StepHooked)
    r: int = 8  # rank of each link
    alpha: float = 16.0
    dropout: float = 0.0
    links: int = 3
    link_steps: int | None = None  # steps per link; None: the run's steps split evenly

    def validate(self) -> None:
        check_lora_fields(self)
        check_range("links", self.links, 1, kind=int)
        if self.link_steps is not None:
            check_range("link_steps", self.link_steps, 1, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, "attn_qv")
        paths = match_targets(model, targets)
        for path in paths:
            wrap(model, path, ColaLinear, name, self.r, self.links, self.link_steps, self.alpha, self.dropout)
        return paths


def save_links(model: nn.Module, path: str | os.PathLike, name: str = "default") -> list[Path]:
    """Write chain `name` as one plain LoRA adapter folder per link: `path/link0`, `path/link1`, ...

    Links that never trained (B still zero) are skipped; trained head copies go with link 0.
    Loading every link and activating them together gives the chain's delta.
    """
    if name not in adapters(model) or adapters(model)[name].config.method != "cola":
        raise ConfigError(f"save_links needs a 'cola' adapter; {name!r} is not one")
    chain = [(p, w) for p, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, ColaLinear)]
    heads = {p: w.merge_deltas() for p, w in iter_deltas(model)
             if w.adapter_name == name and isinstance(w, TrainableCopy)}
    r, links = chain[0][1].r, chain[0][1].links
    trained = [i for i in range(links) if any(w.lora_B[:, i * r:(i + 1) * r].any() for _, w in chain)] or [0]
    out, written = Path(path), []
    with keep_activation(model):
        for i in trained:
            rows = slice(i * r, (i + 1) * r)
            factors = {p: (w.lora_A[rows].detach(), w.lora_B[:, rows].detach() * w.scaling) for p, w in chain}
            tmp = f"{name}-link{i}"
            lora_from_factors(model, tmp, factors, heads=heads if i == trained[0] else None)
            try:
                written.append(save_adapter(model, out / f"link{i}", tmp))
            finally:
                detach(model, tmp)
    return written
