"""LoRA — Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

    h = W0 x + (alpha / r) * B A x          A: (r, in), B: (out, r), B = 0 at init
    rsLoRA (Kalajdzievski, 2023): scale alpha / sqrt(r) instead of alpha / r.

Touches Linear / GPT-2 Conv1D layers (default: the attention query and value projections), and
with `target_parameters` the 3-D expert parameters of mixture-of-experts layers (all experts or
`experts=(...)`: family/lora_experts.py; PEFT's `target_parameters` layout).
The forward adds two small matmuls and nothing else: the second is an `addmm` that adds the
scaled B A x into the base output (no (..., out) temporaries for the scaling and the sum), no
dropout op when p = 0, no dict look-ups, no dtype round trips — so it compiles without graph
breaks. Mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .family.bias import BiasDelta
from ..core.capabilities import (FactorLoadable, FactorTarget, FusedTerms, InitStats, LowRank,
                                 MergesOwnDeltas, PeftLayout, RowBatchable, RowTerms, Weighted)
from ..core.delta import DeltaModule, get_canonical, innermost, wrap
from .family.lora_experts import LoraExperts
from .family.lora_init import DATA, check_init, data_factors, has_offset, weight_factors
from .family.lowrank import add_lowrank, factor_pair, weight_out_in
from .family.peft_fields import lora_layout
from ..core.errors import ConfigError
from ..core.registry import MethodConfig, check_choice, check_range, register
from ..core.qweight import delta_dtype
from ..core.targets import linear_dims, match_parameters, match_targets, role_targets


class LoraLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, alpha: float, dropout: float,
                 rslora: bool, bias: bool, init: str = "default") -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        fan_in, fan_out, self.transposed = linear_dims(inner)
        kw = {"dtype": delta_dtype(inner), "device": inner.weight.device}
        self.lora_A, self.lora_B = factor_pair(r, fan_in, fan_out, inner)
        self.lora_bias = nn.Parameter(torch.zeros(fan_out, **kw)) if bias else None
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.mix = 1.0  # this adapter's weight when stacked (pk.activate(..., weights=...))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.init = init
        self.init_needs = DATA.get(init)  # DataInitialized: what pk.initialize collects for it
        if has_offset(init):  # the starting product, kept frozen: the base seen is W - s B0 A0
            self.init_A = nn.Parameter(torch.zeros_like(self.lora_A))
            self.init_B = nn.Parameter(torch.zeros_like(self.lora_B))
            self.frozen_names = frozenset({"init_A", "init_B"})
            self.notes.append(f"{init}: half of params is the frozen start B0 A0")
        if kw["device"].type != "meta":  # a dry attach (load checks) computes nothing
            self.start(weight_factors(init, weight_out_in(self), r, self.scaling))

    def start(self, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Set the starting (A, B), and the frozen offset to the same values where the init has one."""
        if factors is None:
            return
        with torch.no_grad():
            for own, value in zip((self.lora_A, self.lora_B), factors):
                own.copy_(value)
            if self.frozen_names:
                self.init_A.copy_(self.lora_A)
                self.init_B.copy_(self.lora_B)

    def init_from(self, stats: InitStats) -> None:
        if stats.grad is not None and self.transposed:
            stats = stats._replace(grad=stats.grad.T)
        self.start(data_factors(self.init, weight_out_in(self), stats, self.lora_A.shape[0], self.scaling))
        self.init_needs = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h0 = x
        if self.dropout is not None:
            x = self.dropout(x)
        if self.frozen_names:  # difference first: exactly the base at init (B A == B0 A0 bitwise)
            d = F.linear(F.linear(x, self.lora_A), self.lora_B) - F.linear(F.linear(h0, self.init_A.detach()),
                                                                            self.init_B.detach())
            y = y + d * (self.scaling * self.mix)
        else:
            y = add_lowrank(y, F.linear(x, self.lora_A), self.lora_B, self.scaling * self.mix)
        return y if self.lora_bias is None else y + self.lora_bias * self.mix

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.frozen_names:  # s (B A - B0 A0) as one rank-2r product
            return (torch.cat([self.lora_A, self.init_A.detach()]),
                    torch.cat([self.lora_B, -self.init_B.detach()], dim=1), self.scaling)
        return self.lora_A, self.lora_B, self.scaling

    def fused_terms(self) -> FusedTerms | None:
        """FusableLowRank: (A, B, scale, bias delta, dropout p while training) while this
        forward is exactly base(x) + s B A dropout(x) (+ bias): no frozen offset."""
        if self.frozen_names:
            return None
        shift = None if self.lora_bias is None else self.lora_bias * self.mix
        dropout = self.dropout.p if self.dropout is not None and self.training else 0.0
        return FusedTerms(self.lora_A, self.lora_B, self.scaling * self.mix, shift, dropout)

    def row_terms(self) -> RowTerms:
        shift = None if self.lora_bias is None else self.lora_bias.detach()
        a, b, scale = self.lowrank()
        return RowTerms(a.detach(), b.detach(), scale, shift=shift)

    def delta_weight(self) -> torch.Tensor:
        dw = self.lora_B @ self.lora_A
        if self.frozen_names:  # difference first: exactly zero at init
            dw = dw - self.init_B @ self.init_A
        dw = dw.detach() * (self.scaling * self.mix)
        return dw.T if self.transposed else dw

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_bias is None else self.lora_bias.detach() * self.mix

    def merge_deltas(self) -> dict[str, torch.Tensor]:
        """MergesOwnDeltas (as LoraExperts, so one adapter of both kinds merges alike)."""
        out = {"weight": self.delta_weight(), "bias": self.delta_bias()}
        return {k: v for k, v in out.items() if v is not None}

    def trained_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """FactorLoadable: the trained A and B (without the frozen offset of an init)."""
        return self.lora_A, self.lora_B

    @torch.no_grad()
    def load_factors(self, a: torch.Tensor | None, b: torch.Tensor | None,
                     bias: torch.Tensor | None) -> None:
        """FactorLoadable: A and B zero-padded to this wrapper's rank (None: left as they are);
        the bias delta if given."""
        if a is not None and b is not None:
            self.lora_A.zero_()[: a.shape[0]].copy_(a)
            self.lora_B.zero_()[:, : b.shape[1]].copy_(b)
            if self.frozen_names:  # the delta is now s B A alone: no starting product left
                self.init_A.zero_()
                self.init_B.zero_()
        if bias is not None:
            assert self.lora_bias is not None, "for_factors(bias=True) makes the bias delta"
            self.lora_bias.copy_(bias)


@register("lora", family="reparameterised", paper="Hu et al., 2021, LoRA: Low-Rank Adaptation of Large Language Models")
@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = lora_layout(dora=False)
    capabilities: ClassVar[tuple[type, ...]] = (Weighted, LowRank, RowBatchable, FactorLoadable,
                                                FactorTarget, MergesOwnDeltas)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    bias: str = "none"  # none | lora_only (bias delta on wrapped layers) | all (also every other biased linear)
    init: str = "default"  # where A, B start: family/lora_init.py (pissa, olora, eva, corda, lora-ga, loftq...)
    # 3-D expert parameters ("experts.gate_up_proj", path or .suffix); with them, `targets` None = none
    target_parameters: tuple[str, ...] | None = None
    experts: tuple[int, ...] | None = None  # the experts target_parameters adapt; None = all

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_range("alpha", self.alpha, 0, low_open=True)
        check_range("dropout", self.dropout, 0.0, 0.999)
        check_choice("rslora", self.rslora, (True, False))
        check_choice("bias", self.bias, ("none", "lora_only", "all"))
        check_init(self.init)
        self._check_parameter_targets()

    def _check_parameter_targets(self) -> None:
        if self.experts is not None and (not self.experts or len(set(self.experts)) != len(self.experts) or any(
                isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.experts)):
            raise ConfigError(f"experts must be distinct expert indices >= 0, got {list(self.experts)}")
        if self.target_parameters is None:
            if self.experts is not None:
                raise ConfigError("experts selects among target_parameters' experts: give target_parameters too")
            return
        if not isinstance(self.target_parameters, tuple) or not self.target_parameters or not all(
                isinstance(t, str) and t for t in self.target_parameters):
            raise ConfigError("target_parameters must be a non-empty list of parameter names like "
                              f"'experts.gate_up_proj', got {self.target_parameters!r}")
        # as PEFT's ParamWrapper: these cannot be applied to a parameter used inside its module
        for field, value, allowed in (("dropout", self.dropout, 0.0), ("bias", self.bias, "none")):
            if value != allowed:
                raise ConfigError(f"{field}={value!r} does not work with target_parameters (expert weights): "
                                  f"use {field}={allowed!r}")
        if self.init not in ("default", "gaussian"):
            raise ConfigError(f"init={self.init!r} does not work with target_parameters; use 'default' or 'gaussian'")

    @classmethod
    def for_factors(cls, rank: int, targets: list[str], modules_to_save: list[str],
                    bias: bool) -> LoraConfig:
        """FactorTarget: rank `rank`, scale alpha / r = 1, a bias delta when `bias`."""
        return cls(r=rank, alpha=float(rank), targets=targets, modules_to_save=modules_to_save,
                   bias="lora_only" if bias else "none")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        params = match_parameters(model, self.target_parameters) if self.target_parameters else {}
        for path, names in params.items():
            wrap(model, path, LoraExperts, name, names, self.r, self.alpha, self.rslora, self.init, self.experts)
        if params and not self.targets:  # as PEFT: parameter targets alone unless modules are named too
            return list(params)
        return list(params) + self._inject_modules(model, name)

    def _inject_modules(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, "attn_qv")
        paths = match_targets(model, targets)
        for path in paths:
            wrap(model, path, LoraLinear, name, self.r, self.alpha, self.dropout, self.rslora, self.bias != "none",
                 self.init)
        if self.bias == "all":
            others = [p for p in match_targets(model, "all-linear") if p not in paths]
            for path in others:
                if getattr(innermost(get_canonical(model, path)), "bias", None) is not None:
                    wrap(model, path, BiasDelta, name)
                    paths.append(path)
        return paths
