"""HRA — Yuan et al., 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation" (NeurIPS 2024, arXiv:2405.17484).

    h = W0 H x + b0,    H = Π_{i=1..r} (I - 2 û_i û_iᵀ),   û_i = u_i / |u_i|,   U = [u_1 .. u_r]: (in, r)
    apply_gs: H = I - 2 Q Qᵀ with Q the Gram-Schmidt orthonormalisation of U
    init: u_{2k} = u_{2k+1} (pairs of equal reflections: H = I up to rounding) for r even without
    Gram-Schmidt; otherwise Kaiming-uniform U (not the identity)

A chain of r Householder reflections is an orthogonal matrix at r·in numbers per layer. The
forward reflects each token r times, x ← x - 2 (x·û) ûᵀ (no (in, in) matrix), or, on a plain
nn.Linear fed more tokens than it has outputs, the weight's rows instead (W H, as PEFT does):
4 r · min(tokens, out) · in operations, and the saved intermediates the smaller of the two.
Touches Linear / GPT-2 Conv1D layers (default: attention query and value). Mergeable: W' = W0 H.
Names and init follow PEFT's `HRAConfig` (`hra_u`: (in, r)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import TransformsOutput
from ..core.capabilities import PeftLayout
from .family.peft_fields import need, refuse
from ..core.registry import MethodConfig, check_choice, check_range, register
from .family.dense import RotatedInput, plain_base, wrap_targets


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning u's columns, in order (classical Gram-Schmidt)."""
    cols: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in cols:
            v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


class HraLinear(RotatedInput):
    def __init__(self, base: nn.Module, adapter_name: str, r: int, apply_gs: bool) -> None:
        super().__init__(base, adapter_name)
        pairs = r % 2 == 0 and not apply_gs  # Gram-Schmidt of equal columns would divide by 0
        u = torch.empty(self.fan_in, r // 2 if pairs else r, **self.kw)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u.repeat_interleave(2, dim=1) if pairs else u)
        self.apply_gs = apply_gs

    def directions(self) -> torch.Tensor:
        u = self.hra_u
        return gram_schmidt(u) if self.apply_gs else u / u.norm(dim=0)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        u = self.directions().to(x.dtype)
        if self.apply_gs:
            return x - 2 * (x @ u) @ u.T
        for i in reversed(range(u.shape[1])):  # x H^T = x H_r ... H_1
            x = x - 2 * (x @ u[:, i:i + 1]) * u[:, i]
        return x

    def rotation(self) -> torch.Tensor:
        return self.rotate(torch.eye(self.fan_in, **self.kw)).T

    def reflect_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W H for an (out, in) weight: its rows reflected, H_1 first."""
        u = self.directions().to(w.dtype)
        if self.apply_gs:
            return w - 2 * (w @ u) @ u.T
        for i in range(u.shape[1]):  # W H = W H_1 H_2 ... H_r
            w = w - 2 * (w @ u[:, i:i + 1]) * u[:, i]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = plain_base(self, nn.Linear) if self.enabled else None
        if linear is None or x.numel() // max(x.shape[-1], 1) <= self.fan_out:
            return super().forward(x)  # few tokens, or another base: reflect the tokens
        return F.linear(x, self.reflect_weight(linear.weight), linear.bias)


PEFT = PeftLayout(
    "HRA", {"hra_u": "hra_u"},
    to_peft=lambda c: {"r": c.r, "apply_GS": c.apply_gs, "bias": "none", "init_weights": True},
    from_peft=lambda d: _from_peft(d))


def _from_peft(d: dict) -> dict:
    refuse(d, "bias", "none", "PEFT bias training has no petkit equivalent in HRA")
    return {"r": int(need(d, "r")), "apply_gs": bool(d.get("apply_GS", False))}

@register("hra", family="reparameterised",
          paper="Yuan et al., 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder "
                "Reflection Adaptation")
@dataclass(frozen=True)
class HraConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (TransformsOutput,)
    suggested_lr: ClassVar[float | None] = 0.001
    r: int = 8  # reflections per layer (even: the identity init)
    apply_gs: bool = False

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_choice("apply_gs", self.apply_gs, (True, False))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, HraLinear, name, self.r, self.apply_gs)
