"""AdaLoRA — Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(ICLR 2023, arXiv:2303.10512).

    h = W0 x + alpha / (r + 1e-5) * P (Λ ⊙ (Q x))       Q: (r, in), P: (out, r), Λ: (r, 1) = 0 at init
    importance of triplet i: s_i = S(Λ_i) + mean_j S(Q_ij) + mean_j S(P_ji),   S(w) = Ī(w) Ū(w)
    Ī = EMA_β1 |w ∂L/∂w|,   Ū = EMA_β2 |(|w ∂L/∂w|) - Ī|
    budget b(t): init_r * layers until tinit, then cubic decay to target_r * layers at T - tfinal

After each optimiser step (the training loop's step hooks: training/step_hooks.py), the scores
are updated from the gradients and, every `delta_t` steps in the decay phase (and every step
after it), the singular values Λ_i of the lowest-scoring triplets *over all layers* are set to 0
so that b(t) stay: rank moves to the layers that need it. r = `init_r` numbers are kept per
layer (pruned ones are zeros in the file). PEFT's orthogonality penalty on P, Q (a loss term) is
not added. Touches Linear / GPT-2 Conv1D layers (default: attention query and value). Mergeable.
Names and init follow PEFT's `AdaLoraConfig` (`lora_A` = Q, `lora_B` = P, `lora_E` = Λ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import ReportsMetrics, StepHooked, Weighted
from ..core.delta import DeltaModule
from ..core.capabilities import PeftLayout
from .family.peft_fields import need
from ..core.registry import MethodConfig, check_range, register
from .family.dense import DroppedDelta, factor_kw, wrap_targets
from .family.lowrank import linear_shape, to_base_layout


class RankAllocator:
    """The scores and the global budget of one adapter's layers (shared by its wrappers)."""

    def __init__(self, config: "AdaLoraConfig") -> None:
        self.config, self.layers, self.done_step, self.budget = config, [], -1, 0
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}  # the step's accumulated gradient of each parameter

    def watch(self, p: nn.Parameter) -> None:
        """Keep a copy of p's gradient whenever one is accumulated into it (the stepper clears the
        gradients before the step hooks run)."""
        def record(param: torch.Tensor) -> None:
            self.grads[id(param)] = param.grad.detach().clone()

        p.register_post_accumulate_grad_hook(record)

    def schedule(self, step: int, total: int) -> tuple[int, bool]:
        """(budget, prune now?) at `step` of `total` (PEFT's `budget_schedule`)."""
        c, n = self.config, len(self.layers)
        start, target = c.init_r * n, c.target_r * n
        if step <= c.tinit:
            return start, False
        if step > total - c.tfinal:
            return target, True
        left = 1 - (step - c.tinit) / max(total - c.tfinal - c.tinit, 1)
        return int((start - target) * left ** 3 + target), step % c.delta_t == 0

    def score(self, p: torch.Tensor) -> torch.Tensor:
        """Update p's EMAs of sensitivity and uncertainty from its gradient; return their product."""
        ipt = (p * self.grads.pop(id(p))).abs()  # p after the update, as PEFT's allocator
        old = self.ipt.get(id(p), torch.zeros_like(ipt))
        avg = self.config.beta1 * old + (1 - self.config.beta1) * ipt
        unc = self.config.beta2 * self.unc.get(id(p), torch.zeros_like(ipt)) + (1 - self.config.beta2) * (ipt - avg).abs()
        self.ipt[id(p)], self.unc[id(p)] = avg, unc
        return avg * unc

    def on_step(self, step: int, total: int) -> None:
        if step == self.done_step:
            return
        self.done_step = step
        if any(id(w.lora_E) not in self.grads for w in self.layers):
            return  # before the first step, or a frozen adapter
        with torch.no_grad():
            scores = [self.score(w.lora_E).view(-1) + self.score(w.lora_A).mean(1) + self.score(w.lora_B).mean(0)
                      for w in self.layers]
            self.budget, prune = self.schedule(step, total)
            cut = self.config.init_r * len(self.layers) - self.budget
            if prune and cut > 0:
                threshold = torch.cat(scores).kthvalue(cut).values
                for w, s in zip(self.layers, scores):
                    w.lora_E.masked_fill_((s <= threshold).view(-1, 1), 0.0)


class AdaLoraLinear(DroppedDelta, DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, alpha: float, dropout: float,
                 allocator: RankAllocator) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, self.transposed = linear_shape(base)
        kw = factor_kw(base)
        self.lora_A = nn.Parameter(torch.randn(r, fan_in, **kw) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(fan_out, r, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.scale = alpha / (r + 1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = 1.0
        self.__dict__["allocator"] = allocator  # shared, not a sub-module
        allocator.layers.append(self)
        for p in (self.lora_A, self.lora_B, self.lora_E):
            allocator.watch(p)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * (self.scale * self.mix)

    def delta_weight(self) -> torch.Tensor:
        dw = (self.lora_B @ (self.lora_A * self.lora_E)).detach() * (self.scale * self.mix)
        return to_base_layout(dw, self.transposed)

    def on_train_step(self, step: int, total_steps: int) -> None:
        self.allocator.on_step(step, total_steps)

    def train_metrics(self) -> dict[str, float]:
        return {"adalora_rank": float((self.lora_E != 0).sum())}


PEFT = PeftLayout(
    "ADALORA", {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"},
    to_peft=lambda c: {"init_r": c.init_r, "target_r": c.target_r, "r": c.init_r, "lora_alpha": c.alpha,
                       "lora_dropout": c.dropout, "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.delta_t,
                       "beta1": c.beta1, "beta2": c.beta2, "orth_reg_weight": 0.0,
                       "total_step": c.tinit + c.tfinal + 1, "rank_pattern": None, "bias": "none"},
    from_peft=lambda d: {"init_r": int(need(d, "init_r")), "target_r": int(need(d, "target_r")),
                         "alpha": float(d.get("lora_alpha", 8.0)), "dropout": float(d.get("lora_dropout", 0.0)),
                         "tinit": int(d.get("tinit", 0)), "tfinal": int(d.get("tfinal", 0)),
                         "delta_t": int(d.get("deltaT", 1)), "beta1": float(d.get("beta1", 0.85)),
                         "beta2": float(d.get("beta2", 0.85))},
    fan_in_fan_out=True)

@register("adalora", family="reparameterised",
          paper="Zhang et al., 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
@dataclass(frozen=True)
class AdaLoraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Weighted, StepHooked, ReportsMetrics)
    init_r: int = 12  # rank each layer starts with (and keeps numbers for)
    target_r: int = 8  # mean rank per layer at the end of the budget schedule
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # last steps at the final budget
    delta_t: int = 1  # prune every delta_t steps during the decay
    beta1: float = 0.85
    beta2: float = 0.85

    def validate(self) -> None:
        check_range("init_r", self.init_r, 1, kind=int)
        check_range("target_r", self.target_r, 1, self.init_r, kind=int)
        check_range("alpha", self.alpha, 0, low_open=True)
        check_range("dropout", self.dropout, 0.0, 0.999)
        check_range("tinit", self.tinit, 0, kind=int)
        check_range("tfinal", self.tfinal, 0, kind=int)
        check_range("delta_t", self.delta_t, 1, kind=int)
        for field in ("beta1", "beta2"):
            check_range(field, getattr(self, field), 0.0, 1.0)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        allocator = RankAllocator(self)
        return wrap_targets(model, self.targets, AdaLoraLinear, name, self.init_r, self.alpha, self.dropout,
                            allocator)
