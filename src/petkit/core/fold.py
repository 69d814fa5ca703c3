"""Folding: replace a training-time reparameterisation by the tensors it computes.

Some methods train their delta through a reparameterisation that inference does not need (prefix
tuning's MLP over prefix embeddings). After training, `fold` asks each of the adapter's wrappers
to `fold()` itself (same outputs, fewer parameters) and replaces the adapter's config by the
config's `folded()` form, so a saved folded adapter loads into the folded structure.
Methods without a `folded()` config have nothing to fold and are left as they are.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

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
        folded = getattr(records[name].config, "folded", None)
        if folded is None or folded() == records[name].config:
            continue
        for _, wrapper in iter_deltas(model):
            if wrapper.adapter_name == name and callable(getattr(wrapper, "fold", None)):
                wrapper.fold()
        records[name].config = folded()
        set_trainable(model, name, records[name].trainable)  # new tensors follow the adapter's state
    return model
