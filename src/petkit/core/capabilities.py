"""Knobs some methods' wrappers expose, reached by structure (never by method name).

    pk.set_rank(model, 4, name="default")    # wrappers with `set_rank` (DyLoRA): rank from now on
    pk.expert_load(model, name="default")    # wrappers with `expert_counts` (LoRA mixtures)
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .delta import DeltaModule, iter_deltas
from .errors import AdapterStateError, ConfigError
from .state import adapters, check_known


Factors = tuple[torch.Tensor, torch.Tensor, float]


@runtime_checkable
class LowRank(Protocol):
    def lowrank(self) -> Factors:
        """(A (r, in), B (out, r), scale): the delta is `scale * B @ A` in (out, in) layout."""
        ...



def lowrank_factors(wrapper: DeltaModule) -> Factors | None:
    """The wrapper's (A, B, scale) if its delta is low-rank (see `LowRank`), else None."""
    return wrapper.lowrank() if isinstance(wrapper, LowRank) else None


def set_rank(model: nn.Module, rank: int, name: str = "default") -> nn.Module:
    """Evaluate, merge and save adapter `name` at `rank` from now on, without retraining.

    For methods that train a range of ranks at once (DyLoRA). The rank is stored in the
    adapter's config, so `save_adapter` writes it and `load_adapter` restores it.
    """
    check_known(model, [name])
    record = adapters(model)[name]
    at_rank = getattr(record.config, "at_rank", None)
    if at_rank is None:
        raise ConfigError(f"adapter {name!r} ({record.config.method}) has one fixed rank; "
                          "set_rank needs a method trained over a range of ranks (dylora)")
    wrappers = [w for _, w in iter_deltas(model) if w.adapter_name == name and hasattr(w, "set_rank")]
    if any(w.merged for w in wrappers):
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before changing its rank")
    record.config = at_rank(rank)  # validates the range before anything changes
    for w in wrappers:
        w.set_rank(rank)
    return model


def expert_load(model: nn.Module, name: str = "default", reset: bool = False) -> dict[str, list[float]]:
    """Share of routed tokens each expert took, per layer (path -> one fraction per expert).

    Counts accumulate over every forward since the adapter was attached (or the last reset);
    a perfectly balanced layer with E experts shows 1/E each. Tokens an expert dropped because
    it was over capacity are not counted for it.
    """
    check_known(model, [name])
    out: dict[str, list[float]] = {}
    for path, w in iter_deltas(model):
        if w.adapter_name == name and hasattr(w, "expert_counts"):
            counts: torch.Tensor = w.expert_counts(reset=reset)
            total = float(counts.sum())
            out[path] = [float(c) / total if total else 0.0 for c in counts]
    if not out:
        raise ConfigError(f"adapter {name!r} ({adapters(model)[name].config.method}) has no experts")
    return out
