"""Stacking weights: each active adapter's delta scaled by a float (`pk.activate(..., weights=)`).

    pk.activate(model, ["a", "b"], weights=[1.0, 0.5])   # h = W0 x + 1.0 * d_a(x) + 0.5 * d_b(x)
    pk.adapter_weights(model)                             # {"a": 1.0, "b": 0.5}

A weight scales a wrapper's delta, in its forward and in what merging adds. Wrappers that can be
weighted satisfy `capabilities.Weighted` (a float `mix`); which methods do is read from the
registry (`capabilities.capable(Weighted)`). Weighted merges into a new adapter live in
`adapter_merge.py`, mixed batches in `mixed_batch.py`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .capabilities import Weighted, capable_text
from .delta import iter_deltas
from .errors import AdapterStateError, ConfigError
from .state import adapters


def check_weights(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """Validate per-adapter weights for `names` (None: 1.0 each) without changing anything."""
    if weights is None:
        values = [1.0] * len(names)
    else:
        values = [float(w) for w in weights] if _numbers(weights) else []
        if len(values) != len(names) or not all(math.isfinite(w) for w in values):
            raise ConfigError(f"weights must be {len(names)} finite numbers, one per adapter in "
                              f"{list(names)}; got {weights!r}")
    for adapter, weight in zip(names, values):
        wrappers = [w for _, w in iter_deltas(model) if w.adapter_name == adapter]
        if weight != 1.0:
            fixed = sorted({type(w).__name__ for w in wrappers if not isinstance(w, Weighted)})
            if fixed:
                method = adapters(model)[adapter].config.method
                raise ConfigError(f"adapter {adapter!r} ({method}: {', '.join(fixed)}) cannot be weighted; "
                                  f"methods that can be weighted: {capable_text(Weighted)}")
        if any(w.merged and isinstance(w, Weighted) and w.mix != weight for w in wrappers):
            raise AdapterStateError(f"adapter {adapter!r} is merged with weight {_mix_of(model, adapter)}; "
                                    "unmerge it before changing its weight")
    return values


def _numbers(values: object) -> bool:
    return isinstance(values, Sequence) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def apply_weights(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> None:
    """Set each adapter's weight (checked by `check_weights` first)."""
    chosen = dict(zip(names, weights))
    for _, w in iter_deltas(model):
        if w.adapter_name in chosen and isinstance(w, Weighted):
            w.mix = chosen[w.adapter_name]


def _mix_of(model: nn.Module, name: str) -> float:
    return next((w.mix for _, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, Weighted)), 1.0)


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """Each attached adapter's stacking weight (1.0 unless set by `activate(..., weights=...)`)."""
    return {name: _mix_of(model, name) for name in adapters(model)}
