"""BOFT — Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization" (ICLR 2024, arXiv:2311.06243), in PEFT's layout (`BOFTConfig`).

    h = s ⊙ (W0 (x R)) + b0          per token x (row), bias b0 unchanged, s (out,) = 1 at init
    R = B_m ... B_2 B_1,  B_i = P_i diag(C_i1, ..., C_iD) P_i^T       (m butterfly factors)
    C = (I - S)(I + S)^-1,  S = (Q - Q^T) / 2,  Q: b x b, 0 at init  (R = I: identity)

P_i is the block-butterfly permutation of factor i (PEFT's `block_butterfly_perm`: D / 2^i groups,
pairs of half-blocks interleaved), so m factors of D = in / b blocks of size b reach a dense
orthogonal R with m D b^2 numbers. With m = 1 BOFT is OFT with full b x b block matrices and an
output scale. The permutations are applied as index gathers, the blocks per block (no (in, in)
matrix in the forward). Touches Linear / GPT-2 Conv1D layers (default: attention query and value).
Mergeable: W' = diag(s) W0 R^T. PEFT on a machine without its CUDA kernel computes m = 1 whatever
its config says; petkit always computes the m given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import PeftLayout, TransformsOutput
from ..core.errors import ConfigError
from ..core.registry import MethodConfig, check_range, register
from .family.dense import RotatedInput, remembered, wrap_targets
from .family.lowrank import to_base_layout, weight_out_in
from .family.peft_fields import refuse
from .oft import cayley


def butterfly_perm(n: int, groups: int, half: int, factors: int) -> torch.Tensor:
    """PEFT's block-butterfly permutation: in each of `groups` groups, blocks of `half` entries
    reordered evens first then odds (identity for a single factor)."""
    if factors == 0:
        return torch.arange(n)
    size = n // groups
    slots = torch.cat([torch.arange(0, size // half, 2), torch.arange(1, size // half, 2)])
    order = torch.cat([torch.arange(int(p) * half, int(p) * half + half) for p in slots])
    return torch.cat([g * size + order for g in range(groups)])


class BoftLinear(RotatedInput):
    def __init__(self, base: nn.Module, adapter_name: str, block_size: int, factors: int) -> None:
        super().__init__(base, adapter_name)
        blocks = self.fan_in // block_size if block_size and self.fan_in % block_size == 0 else 0
        if not blocks or (factors > 1 and (blocks % 2 ** (factors - 1) or block_size % 2)):
            raise ConfigError(f"--method.block_size={block_size} with --method.butterfly_factor={factors} does not "
                              f"fit the input width {self.fan_in} (in = blocks * block_size, blocks a multiple "
                              f"of 2^(factor-1), block_size even)")
        self.block_size, self.blocks = block_size, blocks
        perms = [butterfly_perm(self.fan_in, blocks // 2 ** i, block_size // 2, factors - 1) for i in range(factors)]
        self.register_buffer("perm", torch.stack(perms), persistent=False)
        self.register_buffer("unperm", torch.stack([p.argsort() for p in perms]), persistent=False)
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, block_size, block_size, **self.kw))
        self.boft_s = nn.Parameter(torch.ones(self.fan_out, 1, **self.kw))

    def block_rotations(self) -> torch.Tensor:
        q = self.boft_R.flatten(0, 1)
        return cayley(0.5 * (q - q.transpose(-2, -1)), 0).view_as(self.boft_R)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x R (R as PEFT multiplies it): x P_i diag(C_i) P_i^T, the last factor first."""
        rots = self.block_rotations().to(x.dtype)
        for i in reversed(range(rots.shape[0])):
            xb = x[..., self.unperm[i]].reshape(*x.shape[:-1], self.blocks, self.block_size)
            x = torch.einsum("...dk,dkc->...dc", xb, rots[i]).reshape(x.shape)[..., self.perm[i]]
        return x

    def rotation(self) -> torch.Tensor:
        """M with rotate(x) == x M^T: M = R^T."""
        return self.rotate(torch.eye(self.fan_in, dtype=self.boft_R.dtype, device=self.boft_R.device)).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        y = self.base(self.rotate(x))
        bias = getattr(self.base, "bias", None)
        scale = self.boft_s.view(-1).to(y.dtype)
        return y * scale if bias is None else (y - bias) * scale + bias

    def delta_weight(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            w = weight_out_in(self).detach()
            turned = self.boft_s.detach().to(w.dtype) * (w @ self.rotation().detach().to(w.dtype))
            return to_base_layout(turned - w, self.transposed)

        return remembered(self, compute)


def _from_peft(d: dict) -> dict:
    refuse(d, "bias", "none", "PEFT bias training has no petkit equivalent in BOFT")
    refuse(d, "boft_dropout", 0.0, "BOFT's multiplicative dropout is not implemented in petkit")
    if not d.get("boft_block_size"):
        raise ConfigError("PEFT boft_block_size=0 (blocks set by boft_block_num): petkit reads adapters saved "
                          "with a block size")
    return {"block_size": int(d["boft_block_size"]), "butterfly_factor": int(d.get("boft_n_butterfly_factor", 1))}


PEFT = PeftLayout(
    "BOFT", {"boft_R": "boft_R", "boft_s": "boft_s"},
    to_peft=lambda c: {"boft_block_size": c.block_size, "boft_block_num": 0,
                       "boft_n_butterfly_factor": c.butterfly_factor, "boft_dropout": 0.0, "bias": "none",
                       "init_weights": True},
    from_peft=_from_peft, fan_in_fan_out=True)


@register("boft", family="reparameterised",
          paper="Liu et al., 2024, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization")
@dataclass(frozen=True)
class BoftConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (TransformsOutput,)
    suggested_lr: ClassVar[float | None] = 0.001
    block_size: int = 8  # b: blocks of b x b; in / b blocks per factor
    butterfly_factor: int = 1  # m: number of butterfly factors (1: block-diagonal, OFT-like)

    def validate(self) -> None:
        check_range("block_size", self.block_size, 2, kind=int)
        check_range("butterfly_factor", self.butterfly_factor, 1, 12, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, BoftLinear, name, self.block_size, self.butterfly_factor)
