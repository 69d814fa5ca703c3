"""LoKr — Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation" (ICLR 2024, arXiv:2309.14859), as packaged by LyCORIS / PEFT.

    h  = W0 x + dW x,      dW = (alpha / r) * W1 ⊗ W2
    W1: (a, c)   W2: (b, d)    out = a b, in = c d     (a, c / b, d: the factorisation below)
    W2 = W2a W2b (rank r) when r < max(b, d) / 2, else a full matrix; with `decompose_both`,
    W1 likewise. W1 = 0 at init (identity).

`factor` picks the factorisation of each width (PEFT's `decompose_factor`): -1 takes the pair of
divisors nearest the square root, f > 0 takes (f, width / f) where f divides it. KronA
(krona.py) is the same product with both factors full and its own init. Touches Linear /
GPT-2 Conv1D layers (default: attention query and value). Mergeable. Parameter names, shapes
and init follow PEFT's `LoKrConfig` (`lokr_w1`, `lokr_w2_a`, ...), so adapters exchange.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import Weighted
from ..core.capabilities import PeftLayout
from .family.peft_fields import need
from ..core.registry import MethodConfig, check_choice, check_range, register
from .family.dense import DenseDelta, kaiming, wrap_targets, zeros


def factorization(width: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = width, m <= n: (factor, width / factor) if it divides, else the pair
    nearest the square root with m <= factor (PEFT's and LyCORIS's rule, kept exactly)."""
    if factor > 0 and width % factor == 0:
        return factor, width // factor
    limit = width if factor == -1 else factor
    m, n = 1, width
    while m < n:
        new_m = m + 1
        while width % new_m:
            new_m += 1
        new_n = width // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def factor_or_pair(rows: int, cols: int, r: int, full: bool, kw: dict, zero_left: bool) -> dict[str, nn.Parameter]:
    """A full (rows, cols) matrix, or a rank-r pair `_a` (rows, r) @ `_b` (r, cols)."""
    if full:
        return {"": zeros(rows, cols, kw=kw) if zero_left else kaiming(rows, cols, kw=kw)}
    return {"_a": zeros(rows, r, kw=kw) if zero_left else kaiming(rows, r, kw=kw), "_b": kaiming(r, cols, kw=kw)}


class LokrLinear(DenseDelta):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, alpha: float, decompose_both: bool,
                 factor: int) -> None:
        super().__init__(base, adapter_name)
        (a, b), (c, d) = factorization(self.fan_out, factor), factorization(self.fan_in, factor)
        full_w1 = not (decompose_both and r < max(a, c) / 2)
        full_w2 = not r < max(b, d) / 2
        for suffix, p in factor_or_pair(a, c, r, full_w1, self.kw, zero_left=True).items():
            setattr(self, f"lokr_w1{suffix}", p)
        for suffix, p in factor_or_pair(b, d, r, full_w2, self.kw, zero_left=False).items():
            setattr(self, f"lokr_w2{suffix}", p)
        self.scale = alpha / r

    def factor(self, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}", None)
        return full if full is not None else getattr(self, f"lokr_{which}_a") @ getattr(self, f"lokr_{which}_b")

    def weight_delta(self) -> torch.Tensor:
        return torch.kron(self.factor("w1"), self.factor("w2")) * self.scale


PEFT = PeftLayout(
    "LOKR", {k: k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    to_peft=lambda c: {"r": c.r, "alpha": c.alpha, "decompose_both": c.decompose_both, "decompose_factor": c.factor,
                       "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                       "init_weights": True},
    from_peft=lambda d: {"r": int(need(d, "r")), "alpha": float(need(d, "alpha")),
                         "decompose_both": bool(d.get("decompose_both", False)),
                         "factor": int(d.get("decompose_factor", -1))})

@register("lokr", family="reparameterised",
          paper="Yeh et al., 2024, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to "
                "Model Evaluation")
@dataclass(frozen=True)
class LokrConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Weighted,)
    r: int = 8
    alpha: float = 8.0
    decompose_both: bool = False  # also write W1 as a rank-r pair where that is smaller
    factor: int = -1  # -1: divisors nearest the square root; f > 0: (f, width / f) where f divides

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_range("alpha", self.alpha, 0, low_open=True)
        check_choice("decompose_both", self.decompose_both, (True, False))
        if self.factor != -1:
            check_range("factor", self.factor, 1, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, LokrLinear, name, self.r, self.alpha, self.decompose_both,
                            self.factor)
