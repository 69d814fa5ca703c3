"""Which adapters a model holds and which are active: the records every other core module reads."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .delta import DeltaModule, iter_deltas
from .errors import AdapterStateError
from .registry import MethodConfig


@dataclass
class AdapterRecord:
    name: str
    config: MethodConfig
    targets: list[str]
    trainable: bool = True
    fingerprint: dict[str, Any] = field(default_factory=dict)


def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """The named adapters attached to `model`, in attach order."""
    return model.__dict__.setdefault("_petkit_adapters", {})


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.setdefault("_petkit_active", []))


def wrappers_of(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, DeltaModule]]:
    return [(p, w) for p, w in iter_deltas(model) if names is None or w.adapter_name in names]


def check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; attached: {list(known) or 'none'}")
