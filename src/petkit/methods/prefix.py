"""Prefix tuning — Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation";
deep prompts on every layer of any model — Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be
Comparable to Fine-tuning Universally Across Scales and Tasks".

Every attention layer l gets n trainable keys and values (per key/value head) in front of the
keys and values it computes from its input:

    attn_l(x) = softmax(q [Pk_l ; K x]^T / sqrt(d) + mask) [Pv_l ; V x]

The prefixes enter through the model's own key/value cache (`methods.family.virtual_tokens`), so attention masks,
padding, positions (the caller's tokens keep positions 0..L-1; a prefix has none), cached
decoding and `generate` work without touching the model. Encoders (BERT) take the cache too.

Reparameterisation (Li & Liang §4.3, P-tuning v2's option; `projection_dim > 0`): the prefixes of
all layers are computed from n embeddings E (n, hidden) by one MLP,

    [Pk_l ; Pv_l]_l = W2 tanh(W1 E + b1) + b2

which trains more stably. After training, `pk.fold(model)` replaces E and the MLP by the prefixes
they compute (same outputs, fewer parameters); the adapter's config becomes `projection_dim=0`.

init "vocab": the prefixes (or E) start from n random vocabulary tokens — the keys and values the
frozen model computes for them (Li & Liang's real-word initialisation); "random": N(0, init_std);
"zero": keys and values 0 (the MLP's output layer 0), so the prefix only takes a little attention
mass (logit 0 against the real keys' logits) and adds nothing: the model starts close to its base.
Touches the input embedding (wrapped, unchanged: the prefix parameters live in that wrapper).
Not mergeable; not the identity at initialisation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import Foldable, FoldableConfig, PeftLayout
from ..core.delta import get_canonical, innermost, wrap
from ..core.errors import AdapterStateError, ConfigError, TargetError
from .family import peft_prompts
from .family.peft_fields import need
from .family.virtual_tokens import KV, InputExtension, cache_kwarg, ensure_input_hooks, input_embedding_path, new_cache
from ..core.model import disabled
from ..core.registry import MethodConfig, check_choice, check_range, register


class KVPrefix(InputExtension):
    """n key/value prefixes for each of the model's attention layers, direct or through an MLP."""

    def __init__(self, base: nn.Module, adapter_name: str, init: torch.Tensor, projection_dim: int,
                 embed_init: torch.Tensor, positions_after_prefix: bool = False) -> None:
        super().__init__(base, adapter_name)
        self.positions_after_prefix = positions_after_prefix
        self.shape = tuple(init.shape)  # (layers, 2, kv_heads, n, head_dim)
        layers, _, heads, n, dim = self.shape
        kw = {"dtype": init.dtype, "device": init.device}
        if projection_dim == 0:
            self.prefix = nn.Parameter(init.clone())
            self.embedding, self.encoder = None, None
        else:
            self.embedding = nn.Parameter(embed_init.clone())
            self.encoder = nn.Sequential(
                nn.Linear(embed_init.shape[1], projection_dim, **kw), nn.Tanh(),
                nn.Linear(projection_dim, layers * 2 * heads * dim, **kw),
            )

    def prefixes(self) -> torch.Tensor:
        """All prefixes, (layers, 2, kv_heads, n, head_dim)."""
        if self.encoder is None:
            return self.prefix
        layers, _, heads, n, dim = self.shape
        return self.encoder(self.embedding).view(n, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)

    def num_kv(self) -> int:
        return self.shape[3]

    def kv_prefix(self, batch: int) -> KV:
        p = self.prefixes().unsqueeze(2)  # (layers, 2, 1, heads, n, dim)
        return [(p[i, 0].expand(batch, -1, -1, -1), p[i, 1].expand(batch, -1, -1, -1)) for i in range(p.shape[0])]

    def zero_prefixes(self) -> None:
        """Keys and values 0 (through the MLP: its output layer 0, its input E as initialised)."""
        with torch.no_grad():
            for p in [self.prefix] if self.encoder is None else list(self.encoder[2].parameters()):
                p.zero_()

    def fold(self) -> None:
        """Replace embedding + MLP by the prefixes they compute."""
        if self.encoder is None:
            return
        with torch.no_grad():
            value = self.prefixes().detach().clone().contiguous()
        self.encoder, self.embedding = None, None
        self.prefix = nn.Parameter(value)


def check_prefix_fields(cfg: MethodConfig) -> None:
    """The fields every key/value-prefix config shares (see PrefixConfig)."""
    check_range("num_virtual_tokens", cfg.num_virtual_tokens, 1, kind=int)
    check_range("projection_dim", cfg.projection_dim, 0, kind=int)
    check_choice("init", cfg.init, ("vocab", "random", "zero"))
    check_range("init_std", cfg.init_std, 0, low_open=True)
    check_range("seed", cfg.seed, 0, kind=int)
    if cfg.targets is not None:
        raise ConfigError(f"{cfg.method} puts prefixes into every attention layer; targets must be None")


def context_limit(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_length(model: nn.Module, n: int, field: str = "num_virtual_tokens") -> None:
    """A prefix may not be as long as the model's context."""
    limit = context_limit(model)
    if limit is not None and n >= limit:
        raise ConfigError(f"{field}={n} must be < the model's context ({limit} positions)")


def random_tokens(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    weight = innermost(model.get_input_embeddings()).weight
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, weight.shape[0], (1, n), generator=gen).to(weight.device)


def probe_kv(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Keys and values the frozen model computes for `ids` (1, n): (layers, 2, kv_heads, n, head_dim)."""
    cache = new_cache(model)
    was_training = model.training
    model.eval()
    try:
        with disabled(model), torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model, {}): cache})
    finally:
        model.train(was_training)
    layers = getattr(cache, "layers", [])
    if not layers or getattr(layers[0], "keys", None) is None:
        raise TargetError(f"{type(model).__name__} does not fill a key/value cache: key/value prefixes cannot "
                          "enter it (prompt tuning or prefix-propagation work on any model)")
    shapes = {tuple(layer.keys.shape) for layer in layers}
    if len(shapes) != 1:
        raise TargetError(f"attention layers differ in key shapes {sorted(shapes)}: one prefix shape cannot fit all")
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])


def attach_prefix(model: nn.Module, name: str, n: int, projection_dim: int, init: str, init_std: float,
                  seed: int, positions_after_prefix: bool = False) -> tuple[str, KVPrefix]:
    """Wrap the input embedding with a `KVPrefix` for adapter `name`; returns (path, wrapper)."""
    path = input_embedding_path(model)
    check_length(model, n)
    ids = random_tokens(model, n, seed)
    kv = probe_kv(model, ids)
    embed = innermost(get_canonical(model, path)).weight.detach()[ids[0]]
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        kv = (torch.randn(kv.shape, generator=gen) * init_std).to(kv)
        embed = (torch.randn(embed.shape, generator=gen) * init_std).to(embed)
    wrapper = wrap(model, path, KVPrefix, name, kv, projection_dim, embed, positions_after_prefix)
    if init == "zero":
        wrapper.zero_prefixes()
    ensure_input_hooks(model, name)
    return path, wrapper


def _peft_prefix(prefixes: torch.Tensor) -> torch.Tensor:
    """(layers, 2, kv_heads, n, head_dim) as PEFT's `prompt_embeddings` (n, layers 2 kv_heads head_dim)."""
    return prefixes.permute(3, 0, 1, 2, 4).reshape(prefixes.shape[3], -1)


def _from_peft_prefix(value: torch.Tensor, peft_config: dict) -> torch.Tensor:
    layers, heads = int(need(peft_config, "num_layers")), int(need(peft_config, "num_attention_heads"))
    n = value.shape[0]
    return value.reshape(n, layers, 2, heads, -1).permute(1, 2, 3, 0, 4).contiguous()


def _peft_fields(model: nn.Module, name: str) -> dict:
    wrapper = peft_prompts.extension(model, name, KVPrefix)[1]
    if not wrapper.positions_after_prefix:
        raise AdapterStateError("PEFT's prefix tuning starts the caller's positions after the prefix; this adapter "
                                "keeps them at 0..L-1 (positions='own'): attach it with positions='after_prefix' "
                                "to exchange it with PEFT")
    _, _, heads, _, dim = wrapper.shape
    return {**peft_prompts.task_fields(model, heads * dim, heads), "encoder_hidden_size": heads * dim}


# PEFT's "PREFIX_TUNING" on a causal LM: all layers' keys and values in one `prompt_embeddings`; a
# projection (petkit's or PEFT's prefix_projection) travels as the prefixes it computes
PEFT = PeftLayout(
    "PREFIX_TUNING", {}, to_peft=lambda c: {"num_virtual_tokens": c.num_virtual_tokens, "prefix_projection": False},
    from_peft=lambda d: {"num_virtual_tokens": int(need(d, "num_virtual_tokens")), "init": "random",
                         "positions": "after_prefix"},
    params_to_peft=lambda model, name, state: peft_prompts.to_peft(model, name, state, KVPrefix,
                                                                   lambda w: _peft_prefix(w.prefixes())),
    params_from_peft=lambda model, d, tensors: peft_prompts.from_peft(model, d, tensors, "prefix",
                                                                      lambda v: _from_peft_prefix(v, d)),
    fields_to_peft=_peft_fields, fields_from_peft=lambda d, paths: {"targets": None})


@register("prefix", family="additive",
          paper="Li & Liang, 2021, Prefix-Tuning; Liu et al., 2022, P-Tuning v2")
@dataclass(frozen=True)
class PrefixConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    capabilities: ClassVar[tuple[type, ...]] = (Foldable, FoldableConfig)
    suggested_lr: ClassVar[float | None] = 0.01
    num_virtual_tokens: int = 20
    projection_dim: int = 0  # > 0: prefixes = MLP(embeddings) with this hidden width; fold after training
    init: str = "vocab"  # vocab | random | zero
    init_std: float = 0.02
    seed: int = 0
    # "own": the caller's tokens keep positions 0..L-1 (a prefix has none); "after_prefix": they
    # start after the n prefix positions, as PEFT's prefix tuning (the cache's length) has them
    positions: str = "own"

    def validate(self) -> None:
        check_prefix_fields(self)
        check_choice("positions", self.positions, ("own", "after_prefix"))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        path, _ = attach_prefix(model, name, self.num_virtual_tokens, self.projection_dim, self.init,
                                self.init_std, self.seed, self.positions == "after_prefix")
        return [path]

    def folded(self) -> "PrefixConfig":
        return dataclasses.replace(self, projection_dim=0)
