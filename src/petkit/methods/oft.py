"""OFT — Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"
(NeurIPS 2023, arXiv:2306.07280), in PEFT's current form (Qiu et al., 2025, "Orthogonal
Finetuning Made Scalable", arXiv:2506.19847: input-side rotation, Cayley-Neumann).

    h = W0 (R^T x) + b0 ... written per token as  h = base(x R),   R = diag(R_1, ..., R_n)
    R_i = (I + Q_i)(I - Q_i)^-1 ≈ I + 2 Q_i + 2 Q_i² + ...   (Neumann, `neumann_terms`, default)
    R_i = (I - Q_i)(I + Q_i)^-1                               (neumann_terms=0: PEFT's exact path,
                                                               the transpose of the above, as PEFT)
    Q_i = skew(q_i): b x b skew-symmetric from b (b - 1) / 2 numbers;  q = 0 at init (R = I: identity)

The weight's angles between neurons are kept (R is orthogonal up to the Neumann truncation);
each layer trains n blocks of b (b - 1) / 2 numbers, n = in / b (`block_share`: one block for
all). The input is rotated block by block (no (in, in) matrix in the forward). Touches
Linear / GPT-2 Conv1D layers (default: attention query and value). Mergeable: W' = W0 R^T.
Names and Cayley-Neumann series follow PEFT's `OFTConfig` (`oft_R.weight`: (n, b(b-1)/2)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import TransformsOutput
from ..core.errors import ConfigError
from ..core.capabilities import PeftLayout
from .family.peft_fields import refuse
from ..core.registry import MethodConfig, check_choice, check_range, register
from .family.dense import RotatedInput, wrap_targets


def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size (size - 1) / 2) upper-triangle entries -> (n, size, size) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    flat = vec.new_zeros(vec.shape[0], size * size).index_copy(1, rows * size + cols, vec)
    upper = flat.view(-1, size, size)
    return upper - upper.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann_terms: int) -> torch.Tensor:
    """(I - Q)(I + Q)^-1 for each block, exactly (0 terms) or by PEFT's truncated Neumann series."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if neumann_terms == 0:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye + 2 * q if neumann_terms > 1 else eye.clone()
    if neumann_terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


class OftLinear(RotatedInput):
    def __init__(self, base: nn.Module, adapter_name: str, block_size: int, block_share: bool,
                 neumann_terms: int) -> None:
        super().__init__(base, adapter_name)
        if self.fan_in % block_size:
            raise ConfigError(f"--method.block_size={block_size} does not divide the input width {self.fan_in}")
        self.block_size, self.blocks, self.neumann_terms = block_size, self.fan_in // block_size, neumann_terms
        count = 1 if block_share else self.blocks
        self.oft_R = nn.Parameter(torch.zeros(count, block_size * (block_size - 1) // 2, **self.kw))

    def block_rotations(self) -> torch.Tensor:
        r = cayley(skew(self.oft_R, self.block_size), self.neumann_terms)
        return r.expand(self.blocks, -1, -1) if r.shape[0] == 1 else r

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        out = torch.einsum("...rk,rkc->...rc", xb, self.block_rotations().to(x.dtype))
        return out.reshape(x.shape)

    def rotation(self) -> torch.Tensor:
        return torch.block_diag(*self.block_rotations()).T


PEFT = PeftLayout(
    "OFT", {"oft_R": "oft_R.weight"},
    to_peft=lambda c: {"r": 0, "oft_block_size": c.block_size, "block_share": c.block_share, "coft": False,
                       "use_cayley_neumann": c.neumann_terms > 0, "num_cayley_neumann_terms": c.neumann_terms or 5,
                       "module_dropout": 0.0, "bias": "none", "init_weights": True},
    from_peft=lambda d: _from_peft(d), fan_in_fan_out=True)


def _from_peft(d: dict) -> dict:
    refuse(d, "coft", False, "constrained OFT (coft) is not implemented in petkit")
    refuse(d, "bias", "none", "PEFT bias training has no petkit equivalent in OFT")
    if not d.get("oft_block_size"):
        raise ConfigError("PEFT oft_block_size=0 (blocks set by r): petkit reads adapters saved with a block size")
    terms = int(d.get("num_cayley_neumann_terms", 5)) if d.get("use_cayley_neumann", True) else 0
    return {"block_size": int(d["oft_block_size"]), "block_share": bool(d.get("block_share", False)),
            "neumann_terms": terms}

@register("oft", family="reparameterised",
          paper="Qiu et al., 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning")
@dataclass(frozen=True)
class OftConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (TransformsOutput,)
    suggested_lr: ClassVar[float | None] = 0.001
    block_size: int = 32  # b: must divide each target's input width
    block_share: bool = False  # one rotation block for the whole layer
    neumann_terms: int = 5  # Cayley transform by this many Neumann terms (PEFT's default); 0: exact

    def validate(self) -> None:
        check_range("block_size", self.block_size, 2, kind=int)
        check_choice("block_share", self.block_share, (True, False))
        check_range("neumann_terms", self.neumann_terms, 0, 50, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        return wrap_targets(model, self.targets, OftLinear, name, self.block_size, self.block_share,
                            self.neumann_terms)
