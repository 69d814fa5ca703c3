"""Composition of adapters on one model: stacking weights and hot-swapping weights in place.

    pk.activate(model, ["a", "b"], weights=[1.0, 0.5])   # h = W0 x + 1.0 * d_a(x) + 0.5 * d_b(x)
    pk.adapter_weights(model)                             # {"a": 1.0, "b": 0.5}
    pk.swap_adapter(model, "a", "runs/other/adapter")     # new tensors, same modules, no re-attach

A weight scales a wrapper's delta, in its forward and in what merging adds. Wrappers that can be
weighted say so by structure: they carry a float `mix` (the LoRA family, DoRA, KronA, mixtures of
LoRA experts). Weighted merges into a new adapter live in `combine.py`, mixed batches in `mixed.py`.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .delta import iter_deltas
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .model import adapters, _check_known


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
            fixed = sorted({type(w).__name__ for w in wrappers if not hasattr(w, "mix")})
            if fixed:
                method = adapters(model)[adapter].config.method
                raise ConfigError(f"adapter {adapter!r} ({method}: {', '.join(fixed)}) cannot be weighted; "
                                  "weights apply to the LoRA family, DoRA, KronA and LoRA mixtures")
        if any(w.merged and getattr(w, "mix", 1.0) != weight for w in wrappers):
            raise AdapterStateError(f"adapter {adapter!r} is merged with weight {_mix_of(model, adapter)}; "
                                    "unmerge it before changing its weight")
    return values


def _numbers(values: object) -> bool:
    return isinstance(values, Sequence) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def apply_weights(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> None:
    """Set each adapter's weight (checked by `check_weights` first)."""
    chosen = dict(zip(names, weights))
    for _, w in iter_deltas(model):
        if w.adapter_name in chosen and hasattr(w, "mix"):
            w.mix = chosen[w.adapter_name]


def _mix_of(model: nn.Module, name: str) -> float:
    return next((w.mix for _, w in iter_deltas(model) if w.adapter_name == name and hasattr(w, "mix")), 1.0)


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """Each attached adapter's stacking weight (1.0 unless set by `activate(..., weights=...)`)."""
    return {name: _mix_of(model, name) for name in adapters(model)}


@contextlib.contextmanager
def keep_activation(model: nn.Module) -> Iterator[None]:
    """Restore the active adapters and their weights on exit (adapters detached inside drop out)."""
    from .model import activate, active_adapters

    saved, weights = active_adapters(model), adapter_weights(model)
    try:
        yield
    finally:
        kept = [n for n in saved if n in adapters(model)]
        activate(model, kept, [weights[n] for n in kept])


def swap_adapter(model: nn.Module, name: str, source: str | os.PathLike | Mapping[str, torch.Tensor],
                 strict: bool = True) -> nn.Module:
    """Replace adapter `name`'s tensors in place from an adapter folder or a state dict.

    The modules, their parameters (so optimisers and compiled graphs) and the activation stay;
    only values change. A folder is checked like `load_adapter` (checksum, method, config,
    targets, base fingerprint — a warning with strict=False); a state dict (keys as in
    `pk.adapter_state`) is checked for missing/unexpected keys and shapes. On any error nothing
    changes. A merged adapter is refused: unmerge it first.
    """
    from .io import _check_base, load_state_into, read_adapter

    _check_known(model, [name])
    if any(w.merged for _, w in iter_deltas(model) if w.adapter_name == name):
        raise AdapterStateError(f"adapter {name!r} is merged into the base; unmerge it before swapping")
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise AdapterLoadError(f"state dict values must be tensors; {bad[0]!r} is {type(source[bad[0]]).__name__}")
        load_state_into(model, name, dict(source))
        return model
    meta, tensors = read_adapter(source)
    _check_same_kind(model, name, meta, source)
    _check_base(model, meta, source, strict)
    load_state_into(model, name, tensors)
    return model


def _check_same_kind(model: nn.Module, name: str, meta: dict, source: object) -> None:
    record = adapters(model)[name]
    if meta["method"] != record.config.method:
        raise AdapterLoadError(f"{source} holds a {meta['method']!r} adapter; {name!r} is {record.config.method!r}")
    ours = record.config.to_dict()
    differ = sorted(k for k in set(ours) | set(meta["config"]) if ours.get(k) != meta["config"].get(k))
    if differ:
        raise AdapterLoadError(f"{source} has another config than {name!r} (fields {differ}); "
                               "hot-swap needs the same config: detach and load_adapter instead")
    if list(meta["targets"]) != list(record.targets):
        raise AdapterLoadError(f"{source} touches other modules than {name!r}; detach and load_adapter instead")
