"""Folding: replace a training-time reparameterisation by the tensors it computes.

Some methods train their delta through a reparameterisation that inference does not need (prefix
tuning's MLP over prefix embeddings). After training, `fold` asks each of the adapter's wrappers
that is `capabilities.Foldable` to `fold()` itself (same outputs, fewer parameters) and replaces
the adapter's config by its `folded()` form (`capabilities.FoldableConfig`), so a saved folded
adapter loads into the folded structure. Other methods have nothing to fold and are left as they are.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .capabilities import Foldable, FoldableConfig
from .delta import iter_deltas
from .errors import AdapterStateError
from .model import adapters, set_trainable


def fold(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold the named (default: every attached) adapters' reparameterisations away, in place."""
    records = adapters(model)
    names = list(records) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in records]
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; attached: {list(records) or 'none'}")
    for name in names:
        config = records[name].config
        if not isinstance(config, FoldableConfig) or config.folded() == config:
            continue
        for _, wrapper in iter_deltas(model):
            if wrapper.adapter_name == name and isinstance(wrapper, Foldable):
                wrapper.fold()
        records[name].config = config.folded()
        set_trainable(model, name, records[name].trainable)  # new tensors follow the adapter's state
    return model
