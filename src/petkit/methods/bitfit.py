"""BitFit — Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models".

    h = W x + (b + db)        only the bias terms train (db = 0 at init)

Touches every linear layer except the output head, and every LayerNorm that has a bias.
Where a targeted layer has no bias (Llama), a zero bias is added so it can still train;
`summary` says so. Mergeable: merging adds db to the base's bias (creating it if needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .family.bias import BiasDelta
from ..core.delta import canonical_modules, wrap
from ..core.registry import MethodConfig, check_choice, register
from ..core.targets import is_linear, match_targets


def _biasable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.LayerNorm)


@register("bitfit", family="selective", paper="Ben Zaken et al., 2022, BitFit: Simple Parameter-efficient Fine-tuning")
@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    suggested_lr: ClassVar[float | None] = 0.005
    include_norms: bool = True  # also LayerNorm biases (the paper tunes every bias)

    def validate(self) -> None:
        check_choice("include_norms", self.include_norms, (True, False))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        if self.targets is not None:
            paths = match_targets(model, self.targets, accept=_biasable, what="Linear/Conv1D/LayerNorm")
        else:
            paths = match_targets(model, "all-linear")
            if self.include_norms:
                norms = [p for p, _, m in canonical_modules(model) if p and isinstance(m, nn.LayerNorm) and m.bias is not None]
                paths += match_targets(model, norms, accept=_biasable) if norms else []
        for path in paths:
            wrap(model, path, BiasDelta, name)
        return paths
