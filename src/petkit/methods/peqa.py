"""PEQA — Kim et al., 2023, "Memory-Efficient Fine-Tuning of Compressed Large Language Models via
sub-4-bit Integer Quantization" (arXiv:2305.14152).

    W0  ~  s ⊙ (Q - z)        round-to-nearest, asymmetric, b bits (int4 / int3 / ...):
                              Q in [0, 2^b - 1] and zero points z: integers, frozen (buffers)
                              s: one scale per output channel (or per group of `group_size`
                              inputs of a row): the ONLY trained parameters
    h = (s ⊙ (Q - z)) x + b0

Touches Linear / GPT-2 Conv1D layers (default: every linear layer but the output head).

What the contract means here. The adapter is the quantised layer itself: at initialisation the
model equals the RTN-quantised base (tested), not the full-precision base — so PEQA is not an
identity at init, and its table row says so. `pk.disabled(model)` gives the full-precision base
exactly (the wrapper keeps it as `base`, like every wrapper). The adapter file holds the scales
only: the integers and zero points are recomputed by RTN from the base (deterministic; the
fingerprint guarantees the same base), so save/load is exact. On a base already quantised to
integers (EfficientQAT's Block-AP, any compressed-tensors int checkpoint: `core.qweight.
integer_grid`) PEQA takes that grid instead of RTN's, bits and groups included: training its
scales is then EfficientQAT's second stage, E2E-QP. Merging writes s ⊙ (Q - z) into
the base weight. Memory: the wrapper keeps the base for `disabled`, so in petkit PEQA saves
optimiser state (scales only), not weight memory. GPTQ (gptqmodel) runs on the CPU but too slowly
here to compare (docs/compressed.md); AlphaTuning is not provided: no maintained binary-coding kernel exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import MergesOwnDeltas
from ..core.delta import DeltaModule, innermost, wrap
from ..core.errors import ConfigError
from ..core.qweight import delta_dtype, dense_weight, integer_grid
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import linear_dims, match_targets


def rtn_quantize(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest of an (out, in) weight in groups of `group` inputs per row.

    Returns (codes (out, in/group, group) uint8, zero points (out, in/group) uint8, scales (out, in/group)).
    """
    qmax = 2**bits - 1
    w = weight.detach().float().reshape(weight.shape[0], -1, group)
    low = w.amin(dim=-1).clamp(max=0)  # the grid holds 0 exactly
    high = w.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / qmax).clamp(min=1e-8)
    zero = torch.round(-low / scale).clamp(0, qmax)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, qmax)
    return codes.to(torch.uint8), zero.to(torch.uint8), scale


def _live_wrappers_below(wrapper: DeltaModule) -> bool:
    module = wrapper.base
    while isinstance(module, DeltaModule):
        if module.enabled:
            return True
        module = module.base
    return False


class PeqaLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, bits: int, group_size: int | None) -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        fan_in, fan_out, self.transposed = linear_dims(inner)
        self.bits = bits
        group = group_size or fan_in
        if fan_in % group:
            raise ConfigError(f"group_size {group_size} must divide the layer's {fan_in} inputs")
        weight = dense_weight(inner, torch.float32)
        # an integer base (EfficientQAT, compressed-tensors): its own grid, so training its step
        # sizes is EfficientQAT's E2E-QP; else round-to-nearest
        grid = integer_grid(inner)
        codes, zeros, scales = grid or rtn_quantize(weight.T if self.transposed else weight, bits, group)
        self.register_buffer("codes", codes)  # frozen integers
        self.register_buffer("zeros", zeros)
        self.scales = nn.Parameter(scales.to(delta_dtype(inner)))
        self._merged_delta: torch.Tensor | None = None

    def quantized_weight(self) -> torch.Tensor:
        """s ⊙ (Q - z) in (out, in) layout, differentiable in the scales."""
        centred = self.codes.to(self.scales.dtype) - self.zeros.to(self.scales.dtype)[..., None]
        return (self.scales[..., None] * centred).reshape(self.codes.shape[0], -1)

    def _base_weight(self) -> torch.Tensor:
        w = dense_weight(innermost(self.base), self.scales.dtype)
        return w.T if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        w = self.quantized_weight().to(x.dtype)
        if _live_wrappers_below(self):  # stacked on active wrappers: replace only W0's share
            return self.base(x) + F.linear(x, w - self._base_weight().to(x.dtype))
        bias = getattr(innermost(self.base), "bias", None)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        dw = (self.quantized_weight() - self._base_weight()).detach()
        return dw.T if self.transposed else dw

    def merge_deltas(self) -> dict[str, torch.Tensor]:
        """The delta depends on W0, which merging changes: unmerge subtracts what merge added."""
        if not self.merged or self._merged_delta is None:
            self._merged_delta = self.delta_weight()
        return {"weight": self._merged_delta}


@register("peqa", family="reparameterised",
          paper="Kim et al., 2023, Memory-Efficient Fine-Tuning of Compressed LLMs via sub-4-bit Integer Quantization")
@dataclass(frozen=True)
class PeqaConfig(MethodConfig):
    capabilities: ClassVar[tuple[type, ...]] = (MergesOwnDeltas,)
    # int4 on smollm2-135m / rotten-tomatoes, chosen on 200 held-out training examples among
    # 1e-4..3e-3 (docs/compressed.md); minilm-l6 / bbc-news preferred 1e-3
    suggested_lr: ClassVar[float | None] = 3e-4
    bits: int = 4
    group_size: int | None = None  # None: one scale per output channel (the paper's default)

    def validate(self) -> None:
        check_range("bits", self.bits, 2, 8, kind=int)
        if self.group_size is not None:
            check_range("group_size", self.group_size, 1, kind=int)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        paths = match_targets(model, self.targets if self.targets is not None else "all-linear")
        for path in paths:
            wrap(model, path, PeqaLinear, name, self.bits, self.group_size)
        return paths
