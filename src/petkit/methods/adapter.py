"""Bottleneck adapters — Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning";
He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (parallel).

    serial   h = f(x);  h' = h + s * W_up act(W_down h)       (after the wrapped module)
    parallel h' = f(x) + s * W_up act(W_down x)               (beside the wrapped module)

Variants (where they sit by default, from `core.targets` roles of the architecture):
    houlsby   serial, after the attention output projection and after the FFN output
    pfeiffer  serial, after the FFN output only (half the parameters of houlsby)
    parallel  parallel, beside the FFN block (beside its output projection on BERT, which
              has no single FFN module)
With explicit `targets`, houlsby and pfeiffer are the same serial adapter at those modules.

W_up = 0 at init, so the adapter starts as the exact identity. Width of the bottleneck is
`width / reduction_factor`; `activation` is the non-linearity. Not mergeable (non-linear).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.capabilities import TransformsOutput
from ..core.delta import DeltaModule, innermost, wrap
from ..core.errors import TargetError
from ..core.registry import MethodConfig, check_choice, check_range, register
from ..core.qweight import delta_dtype
from ..core.targets import is_linear, linear_dims, match_targets, role_targets

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENT_ROLES = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",), "parallel": ("ffn",)}


def io_widths(module: nn.Module) -> tuple[int, int]:
    """Input and output width of a linear layer, or of a block (its first and last linear)."""
    inner = innermost(module)
    if is_linear(inner):
        fan_in, fan_out, _ = linear_dims(inner)
        return fan_in, fan_out
    linears = [m for m in inner.modules() if is_linear(m)]
    if not linears:
        raise TargetError(f"{type(inner).__name__} has no linear layer to size an adapter by")
    return linear_dims(linears[0])[0], linear_dims(linears[-1])[1]


class Bottleneck(DeltaModule):
    transforms_output = True  # serial: later reparameterised merges under it would be wrong

    def __init__(self, base: nn.Module, adapter_name: str, parallel: bool, reduction: float,
                 activation: str, scale: float) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out = io_widths(base)
        width = fan_in if parallel else fan_out
        hidden = max(1, int(round(width / reduction)))
        ref = next(innermost(base).parameters())
        kw = {"dtype": delta_dtype(innermost(base)), "device": ref.device}
        self.down = nn.Linear(width, hidden, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(hidden, fan_out, **kw)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.parallel = parallel
        self.transforms_output = not parallel
        self.scale = scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(x, *args, **kwargs)
        if not self.enabled:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.up(self.act(self.down(x if self.parallel else h))) * self.scale
        return (h, *out[1:]) if isinstance(out, tuple) else h


@register("adapter", family="additive", paper="Houlsby et al., 2019, Parameter-Efficient Transfer Learning for NLP")
@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    capabilities: ClassVar[tuple[type, ...]] = (TransformsOutput,)
    variant: str = "houlsby"  # houlsby | pfeiffer | parallel
    reduction_factor: float = 16.0
    activation: str = "relu"
    scale: float = 1.0

    def validate(self) -> None:
        check_choice("variant", self.variant, tuple(PLACEMENT_ROLES))
        check_range("reduction_factor", self.reduction_factor, 0, low_open=True)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_range("scale", self.scale, 0, low_open=True)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, *PLACEMENT_ROLES[self.variant])
        paths = match_targets(model, targets, accept=_has_linear, what="a linear layer or a block with linear layers")
        for path in paths:
            wrap(model, path, Bottleneck, name, self.variant == "parallel", self.reduction_factor,
                 self.activation, self.scale)
        return paths


def _has_linear(module: nn.Module) -> bool:
    return is_linear(module) or any(is_linear(m) for m in module.modules())
