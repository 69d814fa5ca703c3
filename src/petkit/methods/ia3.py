"""(IA)3 — Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).

    k  = l_k  ⊙ (W_k x)                 keys and values rescaled at the projection's output
    v  = l_v  ⊙ (W_v x)
    h  = W_down (l_ff ⊙ act(W_up x))    FFN intermediate activations rescaled at the down
                                        projection's input

Learned vectors l, ones at init (the exact identity). Defaults by architecture role: the key and
value projections (`attn_kv`: Llama k_proj/v_proj, BERT key/value) are scaled at their output,
the FFN down projection (`ffn_in`: down_proj, BERT output.dense, GPT-2 mlp.c_proj) at its input.
GPT-2 fuses q, k, v in one `c_attn`; its whole output is scaled (as Hugging Face PEFT does).
`targets` / `feedforward_targets` override the two lists (() for none).

Mergeable: output scaling is W' = diag(l) W (b' = l ⊙ b), input scaling W' = W diag(l). The
merged delta is kept while merged, so unmerging subtracts exactly what merging added.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.capabilities import InputScaled, MergesOwnDeltas, PeftLayout, TransformsOutput
from ..core.delta import DeltaModule, innermost, iter_deltas, wrap
from ..core.errors import AdapterStateError, ConfigError, TargetError
from ..core.registry import MethodConfig, register
from ..core.qweight import delta_dtype, dense_weight
from ..core.targets import ROLES, Targets, linear_dims, match_targets, model_type, role_targets


class IA3Scale(DeltaModule):
    """y = base(x) ⊙ l (on_input=False) or y = base(x ⊙ l) (on_input=True)."""

    transforms_output = True  # multiplicative: a delta under or over it cannot be merged alone

    def __init__(self, base: nn.Module, adapter_name: str, on_input: bool) -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        fan_in, fan_out, self.transposed = linear_dims(inner)
        self.on_input = on_input
        kw = {"dtype": delta_dtype(inner), "device": inner.weight.device}
        self.ia3_l = nn.Parameter(torch.ones(fan_in if on_input else fan_out, **kw))
        self._merged_deltas: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.on_input:
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l

    def delta_weight(self) -> torch.Tensor:
        """(l - 1) applied to the weight's output (or input) axis, in the weight's own layout."""
        weight = dense_weight(innermost(self.base)).detach()
        d = self.ia3_l.detach() - 1
        # Linear weight is (out, in); GPT-2 Conv1D is (in, out).
        rows = self.on_input == self.transposed
        return d[:, None] * weight if rows else weight * d[None, :]

    def delta_bias(self) -> torch.Tensor | None:
        bias = getattr(innermost(self.base), "bias", None)
        if self.on_input or not isinstance(bias, torch.Tensor):
            return None
        return (self.ia3_l.detach() - 1) * bias.detach()

    def merge_deltas(self) -> dict[str, torch.Tensor]:
        """The weight/bias change; while merged, the one that was added (the weights moved since)."""
        if self.merged:
            return self._merged_deltas
        inner = self.base
        while isinstance(inner, DeltaModule):
            if not inner.merged:
                raise AdapterStateError(
                    f"cannot merge (IA)3 adapter {self.adapter_name!r}: it scales "
                    f"{inner.adapter_name!r} ({type(inner).__name__}), which is not merged; merge that first")
            inner = inner.base
        out = {"weight": self.delta_weight(), "bias": self.delta_bias()}
        self._merged_deltas = {k: v for k, v in out.items() if v is not None}
        return self._merged_deltas


def _as_targets(value: object, field: str) -> None:
    if value is not None and not isinstance(value, (str, tuple)):
        raise ConfigError(f"{field} must be a list of names, a regex string or None, got {value!r}")


def _scales(model: nn.Module, name: str) -> dict[str, IA3Scale]:
    return {p: w for p, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, IA3Scale)}


def _peft_shapes(model: nn.Module, name: str, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """PEFT holds l as (out, 1) at an output, (1, in) at an input."""
    out = dict(state)
    for path, w in _scales(model, name).items():
        value = out[f"{path}.ia3_l"]
        out[f"{path}.ia3_l"] = value.reshape(1, -1) if w.on_input else value.reshape(-1, 1)
    return out, {}


def _split_feedforward(peft_config: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """PEFT's `feedforward_modules` (a regex full-match, or names a path ends with) as
    feedforward_targets; the other paths are scaled at their output."""
    entries = peft_config.get("feedforward_modules") or []
    if not isinstance(entries, str) and not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"PEFT feedforward_modules must be names or a regex, got {entries!r}")
    if isinstance(entries, str):
        inputs = [p for p in paths if re.fullmatch(entries, p)]
    else:
        inputs = [p for p in paths if any(p.endswith(e) for e in entries)]
    return {"targets": [p for p in paths if p not in inputs], "feedforward_targets": inputs}


PEFT = PeftLayout(
    "IA3", {"ia3_l": "ia3_l"}, to_peft=lambda c: {"init_ia3_weights": True},
    from_peft=lambda d: {}, fan_in_fan_out=True, from_value=lambda base, local, t: t.reshape(-1),
    params_to_peft=_peft_shapes, fields_from_peft=_split_feedforward,
    fields_to_peft=lambda model, name: {"feedforward_modules": sorted(p for p, w in _scales(model, name).items()
                                                                      if w.on_input)})


@register("ia3", family="additive",
          paper="Liu et al., 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning")
@dataclass(frozen=True)
class IA3Config(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (MergesOwnDeltas, TransformsOutput, InputScaled)
    suggested_lr: ClassVar[float | None] = 0.01
    feedforward_targets: str | tuple[str, ...] | None = None  # scaled at their input (FFN down projections)

    def validate(self) -> None:
        _as_targets(self.feedforward_targets, "feedforward_targets")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        known = model_type(model) in ROLES
        outputs = self.targets if self.targets is not None else role_targets(model, "attn_kv")
        inputs = self.feedforward_targets
        if inputs is None:
            inputs = role_targets(model, "ffn_in") if known else ()
        out_paths, in_paths = _resolve(model, outputs), _resolve(model, inputs)
        both = sorted(set(out_paths) & set(in_paths))
        if both:
            raise ConfigError(f"{both[0]!r} is in both targets (output scaling) and feedforward_targets "
                              "(input scaling); give each module to one of them")
        if not out_paths and not in_paths:
            raise TargetError("(IA)3 has nothing to scale: targets and feedforward_targets are both empty")
        for path in out_paths:
            wrap(model, path, IA3Scale, name, False)
        for path in in_paths:
            wrap(model, path, IA3Scale, name, True)
        return out_paths + in_paths


def _resolve(model: nn.Module, targets: Targets) -> list[str]:
    if isinstance(targets, tuple) and not targets:
        return []
    return match_targets(model, targets)
