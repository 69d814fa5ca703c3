"""Mixed-adapter batches for inference: each row of a batch names its adapter, or None for the base.

    out = pk.mixed_forward(model, ["a", None, "b", "a"], input_ids=ids, attention_mask=mask)
    seqs = pk.mixed_generate(model, ["a", None], input_ids=ids, attention_mask=mask, max_new_tokens=8)

Rows whose adapter is low-rank (every wrapper `RowBatchable`: LoRA, rsLoRA, DoRA, DyLoRA at its
set rank) and rows of the base run together as ONE forward / ONE generate: the base matmuls are
shared and each row's A/B are gathered and applied in a batched product (core.batched_lowrank).
Rows of any other method, or naming several adapters (a tuple stacks them), fall back to one run
per adapter group with exactly that adapter active, and a warning names the methods. Outputs come
back in row order, and every row gets what a single-adapter run of it gives. Refused: a names list
whose length is not the batch size, training mode, merged adapters (their delta sits in the shared
base weights), and labels (a loss is a mean over the whole batch).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
import warnings
from typing import Any

import torch
from torch import nn

from .batched_lowrank import LowRankBank
from .capabilities import RowBatchable, RowTerms, capable_text
from .delta import iter_deltas
from .errors import AdapterStateError, ConfigError
from .model import activate, disabled, keep_activation
from .state import adapters, check_known, wrappers_of

RowName = str | None | Sequence[str]


def mixed_forward(model: nn.Module, adapter_names: Sequence[RowName], *args: Any, **kwargs: Any) -> Any:
    """`model(*args, **kwargs)` where row i runs with adapter `adapter_names[i]` (None: the base)."""
    if "labels" in kwargs:
        raise ConfigError("mixed batches are for inference: pass no labels (a loss mixes every row)")
    return _run_grouped(model, adapter_names, model, args, kwargs, _scatter)


def mixed_generate(model: nn.Module, adapter_names: Sequence[RowName], **kwargs: Any) -> torch.Tensor:
    """`model.generate(**kwargs)` per adapter group; sequences right-padded with the pad token."""
    pad = _pad_id(model, kwargs)
    return _run_grouped(model, adapter_names, model.generate, (), kwargs,
                        lambda outs, groups, n: _scatter_padded(outs, groups, n, pad))


def _run_grouped(model: nn.Module, names: Sequence[RowName], fn: Callable[..., Any], args: tuple,
                 kwargs: dict[str, Any], gather: Callable[[list, list[list[int]], int], Any]) -> Any:
    size = _batch_size(args, kwargs)
    groups = _groups(model, names, size)
    shared = {key: rows for key, rows in groups.items() if batchable(model, key)}
    alone = {key: rows for key, rows in groups.items() if key not in shared}
    _warn_grouped(model, alone)
    outs, order = [], []
    with keep_activation(model), torch.no_grad():
        if shared:
            rows = sorted(r for group in shared.values() for r in group)
            index = torch.tensor(rows)
            with disabled(model), row_adapters(model, [names[r] for r in rows]):
                outs.append(fn(*_take(args, index, size), **_take(kwargs, index, size)))
            order.append(rows)
        for key, rows in alone.items():
            activate(model, list(key))
            index = torch.tensor(rows)
            outs.append(fn(*_take(args, index, size), **_take(kwargs, index, size)))
            order.append(rows)
    return gather(outs, order, size)


def batchable(model: nn.Module, key: tuple[str, ...]) -> bool:
    """True for the base and for one adapter whose every wrapper is RowBatchable."""
    if len(key) > 1:
        return False
    return all(isinstance(w, RowBatchable) for _, w in wrappers_of(model, list(key)))


def adapter_terms(model: nn.Module, name: str) -> dict[str, RowTerms]:
    """path -> RowTerms of every wrapper of adapter `name` (all must be RowBatchable)."""
    return {path: w.row_terms() for path, w in wrappers_of(model, [name]) if isinstance(w, RowBatchable)}


@contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[LowRankBank]:
    """Inside: row i of the model's forwards uses adapter `names[i]` through a LowRankBank.

    The model's own wrappers must be disabled (`pk.disabled`); the bank's hooks go on exit."""
    distinct = sorted({n for n in names if n is not None})
    slot = {name: i + 1 for i, name in enumerate(distinct)}
    bank = LowRankBank(model, len(distinct) + 1)
    try:
        for name in distinct:
            bank.put(slot[name], adapter_terms(model, name))
        bank.rows([0 if n is None else slot[n] for n in names])
        yield bank
    finally:
        bank.close()


def _warn_grouped(model: nn.Module, alone: dict[tuple[str, ...], list[int]]) -> None:
    if not alone:
        return
    records = adapters(model)
    methods = sorted({records[n].config.method for key in alone for n in key})
    warnings.warn(f"mixed batch: adapters of {', '.join(methods)} (or stacked names) cannot share the "
                  f"batched low-rank forward ({capable_text(RowBatchable)} can); their rows run as "
                  f"{len(alone)} separate group(s)", stacklevel=3)


def _groups(model: nn.Module, names: Sequence[RowName], size: int) -> dict[tuple[str, ...], list[int]]:
    if isinstance(names, (str, bytes)) or len(names) != size:
        got = "a string" if isinstance(names, (str, bytes)) else f"{len(names)} names"
        raise ConfigError(f"adapter_names must name one adapter (or None) per row: "
                          f"the batch has {size} rows, got {got}")
    if model.training:
        raise AdapterStateError("mixed batches are for inference: call model.eval() first")
    merged = sorted({w.adapter_name for _, w in iter_deltas(model) if w.merged})
    if merged:
        raise AdapterStateError(f"adapter(s) {merged} are merged into the shared base weights; "
                                "unmerge them before mixed batches")
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, name in enumerate(names):
        key = () if name is None else (name,) if isinstance(name, str) else tuple(name)
        groups.setdefault(key, []).append(row)
    check_known(model, sorted({n for key in groups for n in key}))
    return groups


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    raise ConfigError("mixed batches need a batched tensor input (input_ids, inputs_embeds or x)")


def _take(values: Any, index: torch.Tensor, size: int) -> Any:
    """The rows `index` of every batch-first tensor in `values` (tuples and dicts recursed)."""
    if isinstance(values, torch.Tensor):
        return values[index.to(values.device)] if values.dim() >= 1 and values.shape[0] == size else values
    if isinstance(values, dict):
        return {k: _take(v, index, size) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(_take(v, index, size) for v in values)
    return values


def _scatter(outs: list[Any], groups: list[list[int]], size: int) -> Any:
    """Put each group's outputs back at its rows; non-tensor parts (caches, scalars) become None."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return None
        shapes = {tuple(o.shape[1:]) for o in outs}
        if len(shapes) > 1:
            raise ConfigError(f"groups produced outputs of different shapes {sorted(shapes)}; "
                              "they cannot share a batch")
        full = first.new_empty((size, *first.shape[1:]))
        for out, rows in zip(outs, groups):
            full[torch.tensor(rows, device=full.device)] = out
        return full
    if isinstance(first, dict):
        merged = {k: _scatter([o[k] for o in outs], groups, size) for k in first}
        return type(first)(**merged) if hasattr(first, "to_tuple") else merged
    if isinstance(first, (tuple, list)):
        return type(first)(_scatter([o[i] for o in outs], groups, size) for i in range(len(first)))
    return None


def _pad_id(model: nn.Module, kwargs: dict[str, Any]) -> int:
    cfg = getattr(model, "generation_config", None)
    pad = kwargs.get("pad_token_id", getattr(cfg, "pad_token_id", None))
    if pad is None:
        pad = getattr(cfg, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    return 0 if pad is None else int(pad)


def _scatter_padded(outs: list[torch.Tensor], groups: list[list[int]], size: int, pad: int) -> torch.Tensor:
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ConfigError("mixed_generate returns token ids: pass return_dict_in_generate=False")
    length = max(o.shape[1] for o in outs)
    full = outs[0].new_full((size, length), pad)
    for out, rows in zip(outs, groups):
        full[torch.tensor(rows, device=full.device), : out.shape[1]] = out
    return full
