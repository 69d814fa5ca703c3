"""Tokens inserted in front of the hidden states at one block and carried by the later blocks.

The model computes its attention mask, rotary position embeddings and position ids once, for
the caller's L tokens. A method that prepends n vectors to the hidden states entering block k
(late prompt tuning) wraps blocks k..last; each wrapper rewrites the call of its block:

    prefill (tokens inserted now)        mask (B,1,L,L) -> (B,1,n+L,n+L):
                                            [ prompt rows: causal among the n, nothing after |
                                              (encoders: the n and every key a token may see) ]
                                            [ token rows: all n, then the original mask ]
                                         rotary cos/sin: n rows of position 0 (cos=1, sin=0)
                                         position_ids: n zeros in front
    cached decoding (tokens in the cache)  mask (B,1,q,kv) -> (B,1,q,n+kv)

and the last block drops the n positions from its output, so the final norm, the head, the
logits and the labels line up with the caller's tokens. A mask of None (SDPA with no padding)
stays None: a causal kernel over [n prompt; L tokens] is exactly the rule above; a (B, L)
padding mask (flash attention) gets n ones in front, for the same reason.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from petkit.core.signatures import forward_signature

CACHE_ARGS = ("cache", "past_key_values")


def bind_call(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """The block's call as named arguments (blocks are called positionally by some models)."""
    return forward_signature(type(block)).bind(block, *args, **kwargs)


def _var_kwargs(bound: inspect.BoundArguments) -> dict[str, Any]:
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return bound.arguments.setdefault(name, {})
    return {}


def get_arg(bound: inspect.BoundArguments, name: str) -> Any:
    if name in bound.arguments:
        return bound.arguments[name]
    return _var_kwargs(bound).get(name)


def set_arg(bound: inspect.BoundArguments, name: str, value: Any) -> None:
    if name in bound.signature.parameters:
        bound.arguments[name] = value
    else:
        _var_kwargs(bound)[name] = value


def call(block: nn.Module, bound: inspect.BoundArguments) -> Any:
    """Call `block` with the (rewritten) bound arguments, less its `self`."""
    return block(*bound.args[1:], **bound.kwargs)


def cached_length(bound: inspect.BoundArguments, layer: int) -> int:
    """Tokens already in the KV cache of block `layer` (0 without a cache)."""
    for name in CACHE_ARGS:
        cache = get_arg(bound, name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length(layer))
    return 0


def is_causal(block: nn.Module) -> bool:
    """Whether the block's self-attention is causal (decoders) or bidirectional (encoders)."""
    flags = [m.is_causal for m in block.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and flags[0]


def _values(mask: torch.Tensor) -> tuple[Any, Any]:
    """(attend, block) in the mask's convention: bool True/False, or additive 0/-inf."""
    if mask.dtype == torch.bool:
        return True, False
    return 0.0, torch.finfo(mask.dtype).min


def visible_keys(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, L) bool: keys any query may attend to (the non-padding tokens)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if mask.dim() == 2:  # (B, L) padding mask (flash attention): 1 = token
        return mask.bool()
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed.any(dim=-2).reshape(allowed.shape[0], -1).expand(batch, -1)


def extend_mask(mask: torch.Tensor | None, n: int, inserting: bool, causal: bool) -> torch.Tensor | None:
    """The 4-d mask for n extra positions in front (see the module docstring)."""
    if mask is None:
        return mask
    if mask.dim() == 2:  # (B, L) padding mask: the kernel applies causality itself
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    attend, block = _values(mask)
    b, h, q, kv = mask.shape
    front = torch.full((b, h, q, n), attend, dtype=mask.dtype, device=mask.device)
    rows = torch.cat([front, mask], dim=-1)
    if not inserting:
        return rows
    own = torch.full((n, n), attend, dtype=mask.dtype, device=mask.device)
    if causal:
        own = own.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=mask.device).tril(), block)
        rest = torch.full((b, h, n, kv), block, dtype=mask.dtype, device=mask.device)
    else:
        keys = visible_keys(mask, b, kv, mask.device)[:, None, None, :]
        rest = torch.where(keys, attend, block).to(mask.dtype).expand(b, h, n, kv)
    top = torch.cat([own.expand(b, h, n, n), rest], dim=-1)
    return torch.cat([top, rows], dim=-2)


def extend_call(bound: inspect.BoundArguments, n: int, inserting: bool, causal: bool) -> None:
    """Rewrite mask, rotary embeddings and position ids of a block call for n front positions."""
    set_arg(bound, "attention_mask", extend_mask(get_arg(bound, "attention_mask"), n, inserting, causal))
    if not inserting:
        return
    rotary = get_arg(bound, "position_embeddings")
    if isinstance(rotary, tuple) and len(rotary) == 2:
        cos, sin = rotary
        shape = (cos.shape[0], n, *cos.shape[2:])
        set_arg(bound, "position_embeddings", (torch.cat([cos.new_ones(shape), cos], dim=1),
                                               torch.cat([sin.new_zeros(shape), sin], dim=1)))
    pos = get_arg(bound, "position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2:
        set_arg(bound, "position_ids", torch.cat([pos.new_zeros(pos.shape[0], n), pos], dim=1))


def strip_front(output: Any, n: int) -> Any:
    """Drop the first n positions of a block's output (a tensor or a tuple led by one)."""
    if isinstance(output, tuple):
        return (output[0][:, n:], *output[1:])
    return output[:, n:]
