"""The running batch's key/value cache: rows join after their own prefill and leave when done.

All rows share one transformers `DynamicCache` of length L, left-padded: row i's real positions
are the last ones and `mask[i]` marks them (1 real, 0 pad). A new row, prefilled alone, joins by
padding the shorter side on the left and concatenating along the batch; leaving rows are dropped
with an index select, and padding columns no row needs any more are cut away. A decode step feeds
each row's last token at position `mask.sum(1)` (its own length), so each row attends exactly to
its own tokens: no cross-talk.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petkit.core.errors import ConfigError


def cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the cache argument (transformers renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _layers(cache: object) -> list:
    """The cache's layers, checked to be plain growing full-attention layers."""
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", []))
    bad = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if bad:
        raise ConfigError(f"the serving engine batches full-attention caches; this model's cache has {sorted(bad)} "
                          "layers (sliding window / linear attention are not supported)")
    return layers


class BatchCache:
    """Left-padded key/value cache and attention mask of the running rows."""

    def __init__(self) -> None:
        self.cache: object | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def join(self, cache: object, length: int) -> None:
        """Append a row prefilled alone (its cache holds `length` positions, batch 1)."""
        mask = torch.ones(1, length, dtype=torch.long, device=self.mask.device if self.rows else None)
        if self.cache is None or self.rows == 0:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], length)
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            for kind in ("keys", "values"):
                a, b = getattr(mine, kind), getattr(theirs, kind)
                setattr(mine, kind, torch.cat([_left_pad(a, width), _left_pad(b, width)], dim=0))
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask.to(self.mask.device), width)], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); cut padding columns no row needs."""
        if not rows:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-pad columns
        self.mask = mask[:, start:]
        for layer in _layers(self.cache):
            for kind in ("keys", "values"):
                value = getattr(layer, kind)
                setattr(layer, kind, value.index_select(0, index.to(value.device))[:, :, start:])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask with the new position, position ids [rows, 1]) for one decode step."""
        positions = self.mask.sum(1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask, positions


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (-2 for [B, H, L, D] caches, -1 for [B, L] masks) on the left."""
    dim = -1 if t.dim() == 2 else -2
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    return F.pad(t, (extra, 0)) if dim == -1 else F.pad(t, (0, 0, extra, 0))
