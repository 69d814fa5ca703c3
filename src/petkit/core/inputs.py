"""Input extension: methods that add virtual tokens in front of the input (prompt tuning).

One forward pre-hook on the model root turns `input_ids` into `inputs_embeds` with the active
virtual tokens prepended, and extends `attention_mask`, `labels`, `token_type_ids`,
`position_ids` and `cache_position` to match. During cached generation (the cache already
holds the virtual tokens) it only shifts masks and positions. A forward hook strips the
virtual positions from `logits`, so outputs line up with the caller's tokens: the model's
own `forward(input_ids=..., labels=...)` and `generate` work unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .delta import DeltaModule, iter_deltas
from .errors import TargetError
from .model import add_detach_hook


class InputExtension(DeltaModule):
    """A wrapper around the input embedding that supplies virtual token embeddings."""

    def virtual_tokens(self, batch: int) -> torch.Tensor:  # (batch, n, hidden)
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)


def input_embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        raise TargetError(f"{type(model).__name__} has no input embeddings (get_input_embeddings): "
                          "input-extending methods need a transformers-style model")
    from .delta import canonical_modules, innermost

    for path, outer, inner in canonical_modules(model):
        if outer is emb or inner is innermost(emb):
            return path
    raise TargetError("input embedding module not found in the model tree")


def _cache_len(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def _prepend(t: torch.Tensor | None, n: int, value: int | float) -> torch.Tensor | None:
    if t is None:
        return None
    pad = torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def _active(model: nn.Module) -> list[InputExtension]:
    return [w for _, w in iter_deltas(model) if isinstance(w, InputExtension) and w.enabled]


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    ext = _active(model)
    if not ext:
        return args, kwargs
    if args:  # model(input_ids, ...) positional
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return args, kwargs
    batch = ref.shape[0]
    n = sum(e.virtual_tokens(1).shape[1] for e in ext)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = _prepend(mask, n, 1)
    if _cache_len(kwargs) > 0:  # decoding: the cache already holds the virtual tokens
        for key in ("position_ids", "cache_position"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + n
        return args, kwargs
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    virtual = torch.cat([e.virtual_tokens(batch) for e in ext], dim=1).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    kwargs["input_ids"] = None
    kwargs["labels"] = _prepend(kwargs.get("labels"), n, -100) if kwargs.get("labels") is not None and kwargs["labels"].dim() == 2 else kwargs.get("labels")
    kwargs["token_type_ids"] = _prepend(kwargs.get("token_type_ids"), n, 0)
    for key in ("position_ids", "cache_position"):
        pos = kwargs.get(key)
        if pos is not None:
            head = torch.arange(n, device=pos.device, dtype=pos.dtype)
            head = head.expand(*pos.shape[:-1], n) if pos.dim() > 1 else head
            kwargs[key] = torch.cat([head, pos + n], dim=-1)
    model.__dict__["_petkit_stripped"] = (ref.shape[1], n)
    return args, {k: v for k, v in kwargs.items() if not (k in ("token_type_ids",) and v is None)}


def _post_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    info = model.__dict__.pop("_petkit_stripped", None)
    logits = getattr(output, "logits", None)
    if info is None or logits is None or logits.dim() != 3:
        return output
    length, n = info
    if logits.shape[1] == length + n:
        output.logits = logits[:, n:]
    return output


def ensure_input_hooks(model: nn.Module, adapter_name: str) -> None:
    """Install the root hooks once per model; removed when the last extension is detached."""
    hooks = model.__dict__.get("_petkit_input_hooks")
    if hooks is None:
        hooks = (
            model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            model.register_forward_hook(_post_hook, with_kwargs=True),
        )
        model.__dict__["_petkit_input_hooks"] = hooks

    def cleanup() -> None:
        if not any(isinstance(w, InputExtension) for _, w in iter_deltas(model)):
            for h in model.__dict__.pop("_petkit_input_hooks", ()):
                h.remove()

    add_detach_hook(model, adapter_name, cleanup)
