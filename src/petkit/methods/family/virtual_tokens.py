"""Input extension: methods that add virtual tokens in front of the input (prompt tuning) or
key/value prefixes in front of every attention layer's keys and values (prefix tuning).

One forward pre-hook on the model root does the bookkeeping for every active extension:
- virtual tokens: `input_ids` become `inputs_embeds` with the tokens prepended; `attention_mask`,
  `labels`, `token_type_ids`, `position_ids`, `cache_position` and a `logits_to_keep` index tensor
  are extended or shifted to match, and a forward hook strips the virtual positions from `logits`.
- key/value prefixes: the model's own key/value cache (kwarg `cache`; `past_key_values` on older
  transformers) is pre-filled with every layer's prefix and `attention_mask` gets ones in front.
  The caller's tokens keep their positions (0..L-1): a prefix has keys and values, no position.
Cache order is [key/value prefixes][virtual tokens][caller's tokens]. During cached generation
(the cache already holds both) the hook only extends the mask and shifts positions, so the
model's own `forward(input_ids=..., labels=...)` and `generate` work unchanged.

While a forward that carries an extension's content runs, `ext.live` (a `Live`) says where that
content sits, so per-layer wrappers of the same method (gates, propagated prefixes) can find it.
It is None in decoding steps (the content is already in the cache) and outside a forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.core.delta import DeltaModule, canonical_modules, innermost, iter_deltas
from petkit.core.errors import ConfigError, TargetError
from petkit.core.model import add_detach_hook
from petkit.core.signatures import forward_params

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Live:
    """Where an extension's content sits in the forward that is running."""

    start: int  # first index: in the hidden sequence (virtual tokens) or the cache (key/value prefixes)
    end: int
    offset: int  # virtual positions in front of the caller's first token
    mask: torch.Tensor | None  # the caller's 2-D attention mask
    cache: Any | None  # the cache that holds the key/value prefixes


class InputExtension(DeltaModule):
    """A wrapper around the input embedding that supplies virtual tokens and/or key/value prefixes.

    `per_layer` extensions have wrappers elsewhere that read `live` during the forward; they
    cannot run under gradient checkpointing (the recomputation happens after the forward).
    """

    per_layer = False

    def __init__(self, base: nn.Module, adapter_name: str) -> None:
        super().__init__(base, adapter_name)
        self.live: Live | None = None

    def virtual_tokens(self, batch: int) -> torch.Tensor | None:  # (batch, n, hidden)
        return None

    def kv_prefix(self, batch: int) -> KV | None:
        """Per attention layer in cache order: (keys, values), each (batch, kv_heads, n, head_dim)."""
        return None

    def num_virtual(self) -> int:
        tokens = self.virtual_tokens(1)
        return 0 if tokens is None else int(tokens.shape[1])

    def num_kv(self) -> int:
        return 0

    # key/value prefixes whose length the caller's positions start after (PEFT's prefix tuning);
    # by default a prefix has no position and the caller's tokens keep 0..L-1
    positions_after_prefix = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)


class LayerExtension(DeltaModule):
    """A wrapper around transformer block `layer` that acts while the content of its `source`
    extension (same adapter) is in the running forward: `transform(hidden, live)` returns the
    block's input hidden states. In decoding steps (`live` is None) the block runs unchanged."""

    def __init__(self, base: nn.Module, adapter_name: str, source: InputExtension, layer: int) -> None:
        super().__init__(base, adapter_name)
        object.__setattr__(self, "source", source)  # not a sub-module: its parameters are its own wrapper's
        source.per_layer = True
        self.layer = layer

    def transform(self, hidden: torch.Tensor, live: Live) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.source.live if self.enabled else None
        if live is not None:
            if args:
                args = (self.transform(args[0], live), *args[1:])
            else:
                kwargs["hidden_states"] = self.transform(kwargs["hidden_states"], live)
        return self.base(*args, **kwargs)


def input_embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        raise TargetError(f"{type(model).__name__} has no input embeddings (get_input_embeddings): "
                          "input-extending methods need a transformers-style model")
    if not isinstance(getattr(innermost(emb), "weight", None), torch.Tensor):  # a ViT's patches
        raise TargetError(f"{type(model).__name__} takes no token ids (its input embedding is "
                          f"{type(innermost(emb)).__name__}): prompt/prefix methods extend a text "
                          "model's token sequence; for a vision transformer use 'vpt'")

    for path, outer, inner in canonical_modules(model):
        if outer is emb or inner is innermost(emb):
            return path
    raise TargetError("input embedding module not found in the model tree")


def cache_kwarg(model: nn.Module, kwargs: dict[str, Any]) -> str:
    if kwargs.get("past_key_values") is not None:
        return "past_key_values"
    params = forward_params(type(model))
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


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
    """The enabled extensions, in model order; every extension's `live` is reset."""
    found = []
    for _, w in iter_deltas(model):
        if isinstance(w, InputExtension):
            w.live = None
            if w.enabled:
                found.append(w)
    return found


def _check_checkpointing(model: nn.Module, ext: list[InputExtension], n_kv: int) -> None:
    if not model.training:
        return
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if not getattr(model, flag, False):
        return
    if n_kv or any(e.per_layer for e in ext):
        names = sorted({e.adapter_name for e in ext if e.per_layer or e.num_kv()})
        raise ConfigError(f"adapter(s) {names} extend keys/values or per-layer states, which gradient "
                          "checkpointing would recompute without them; disable gradient checkpointing")


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    ext = _active(model)
    if not ext:
        return args, kwargs
    if args:  # model(input_ids, ...) positional
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return args, kwargs
    tok = [e for e in ext if e.num_virtual()]
    kv = [e for e in ext if e.num_kv()]
    n_tok, n_kv = sum(e.num_virtual() for e in tok), sum(e.num_kv() for e in kv)
    _check_checkpointing(model, ext, n_kv)
    mask = kwargs.get("attention_mask")
    mask = mask if mask is not None and mask.dim() == 2 else None
    if mask is not None:
        kwargs["attention_mask"] = _prepend(mask, n_kv + n_tok, 1)
    past = _cache_len(kwargs)
    if past > 0:  # decoding: the cache already holds prefixes and virtual tokens
        _shift_decoding(model, kwargs, ref, n_tok, n_kv, past, ext)
        return args, kwargs
    if kv:
        _fill_cache(model, kwargs, kv, ref, n_tok, mask)
    if tok:
        kwargs = _prepend_tokens(model, kwargs, tok, ref, n_tok, n_kv, mask)
    return args, kwargs


def _shift_decoding(model: nn.Module, kwargs: dict[str, Any], ref: torch.Tensor, n_tok: int, n_kv: int,
                    past: int, ext: list[InputExtension]) -> None:
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n_tok + _shift(ext)
    elif n_kv and "position_ids" in forward_params(type(model)):  # the model would count the prefix
        kwargs["position_ids"] = torch.arange(ref.shape[1], device=ref.device).unsqueeze(0) + (past - n_kv
                                                                                               + _shift(ext))
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = kwargs["cache_position"] + n_tok + n_kv


def _shift(ext: list[InputExtension]) -> int:
    """Positions the caller's tokens start after: the prefixes that count as positions."""
    return sum(e.num_kv() for e in ext if e.positions_after_prefix)


def new_cache(model: nn.Module) -> Any:
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise TargetError("key/value prefixes need transformers' DynamicCache") from None
    return DynamicCache(config=getattr(model, "config", None))


def _fill_cache(model: nn.Module, kwargs: dict[str, Any], kv: list[InputExtension], ref: torch.Tensor,
                n_tok: int, mask: torch.Tensor | None) -> None:
    """Put every layer's key/value prefixes into the (empty or new) cache the model will use."""
    key = cache_kwarg(model, kwargs)
    cache = kwargs.get(key)
    if cache is None:
        cache = new_cache(model)
        # the caller asked for no cache: do not hand ours back (generate would feed it in again)
        model.__dict__["_petkit_hide_cache"] = kwargs.get("use_cache") is False
    prefixes = [e.kv_prefix(ref.shape[0]) for e in kv]
    if len({len(p) for p in prefixes}) != 1:
        raise TargetError("active key/value prefixes disagree on the number of attention layers")
    device = ref.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    for layer, parts in enumerate(zip(*prefixes)):
        keys = torch.cat([k for k, _ in parts], dim=2)
        values = torch.cat([v for _, v in parts], dim=2)
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        cache.update(keys, values, layer)
    kwargs[key] = cache
    if "position_ids" in forward_params(type(model)):  # the caller's own, or 0..L-1; after the prefix if it counts
        own = kwargs.get("position_ids")
        if own is None:
            own = torch.arange(ref.shape[1], device=ref.device).unsqueeze(0)
        kwargs["position_ids"] = own + _shift(kv) if _shift(kv) else own
    start = 0
    for e in kv:
        e.live = Live(start, start + e.num_kv(), n_tok, mask, cache)
        start += e.num_kv()


def _prepend_tokens(model: nn.Module, kwargs: dict[str, Any], tok: list[InputExtension], ref: torch.Tensor,
                    n: int, n_kv: int, mask: torch.Tensor | None) -> dict[str, Any]:
    """Virtual tokens in front of the caller's tokens; labels, types and positions follow."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = model.get_input_embeddings()(kwargs["input_ids"])
    virtual = torch.cat([e.virtual_tokens(ref.shape[0]) for e in tok], dim=1).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    kwargs["input_ids"] = None
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2:
        kwargs["labels"] = _prepend(labels, n, -100)
    kwargs["token_type_ids"] = _prepend(kwargs.get("token_type_ids"), n, 0)
    for key in ("position_ids", "cache_position"):
        pos = kwargs.get(key)
        if pos is not None:
            head = torch.arange(n, device=pos.device, dtype=pos.dtype)
            head = head.expand(*pos.shape[:-1], n) if pos.dim() > 1 else head
            kwargs[key] = torch.cat([head, pos + n], dim=-1) + (n_kv if key == "cache_position" else 0)
    if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):  # indices of the caller's positions
        kwargs["logits_to_keep"] = kwargs["logits_to_keep"] + n
    start = 0
    for e in tok:
        e.live = Live(start, start + e.num_virtual(), n, mask, kwargs.get("cache"))
        start += e.num_virtual()
    model.__dict__["_petkit_stripped"] = (ref.shape[1], n)
    return {k: v for k, v in kwargs.items() if not (k == "token_type_ids" and v is None)}


def _post_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    for _, w in iter_deltas(model):
        if isinstance(w, InputExtension):
            w.live = None
    if model.__dict__.pop("_petkit_hide_cache", False) and isinstance(output, dict):
        for key in ("cache", "past_key_values"):
            if key in output:
                output[key] = None
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
