"""Prefix-propagation — Li et al., 2023, "Prefix Propagation: Parameter-Efficient Tuning for Long
Sequences" (ACL 2023).

n prefix hidden states are prepended to the input and, unlike prefix tuning's (overwritten by
new keys and values in every layer), they propagate through the layers: each block adds its own
trainable prefix to the hidden states the previous block computed at the prefix positions:

    H_0 = [P_0 ; E(x)]                                  (into block 0)
    H_l = [block_{l-1}(H_{l-1})[:n] + P_l ; block_{l-1}(H_{l-1})[n:]]      (into block l >= 1)

One vector per prefix token and layer where prefix tuning needs a key and a value: half the
parameters. P_0 is a soft prompt (`methods.prompt`'s module: `methods.family.virtual_tokens` extends masks, labels,
token types and positions, strips the prefix from the logits and handles `generate`); P_l (l >= 1)
sits in a wrapper around block l and starts at zero, so at initialisation the method is prompt
tuning with P_0. In cached decoding the prefix is already in the cache and nothing is added.

Touches the input embedding and blocks 1..L-1. Not mergeable; not the identity at init.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.delta import wrap
from ..core.errors import TargetError
from .family.virtual_tokens import LayerExtension, Live, ensure_input_hooks, input_embedding_path
from ..core.blocks import layer_paths
from .family.prompt_init import check_prompt_fields, initial_prompt
from ..core.registry import MethodConfig, register
from .prompt import PromptEmbedding


class PropagatedPrefix(LayerExtension):
    """Adds this block's prefix P_l to the hidden states at the prefix positions."""

    def __init__(self, base: nn.Module, adapter_name: str, source: PromptEmbedding, layer: int) -> None:
        super().__init__(base, adapter_name, source, layer)
        self.prefix = nn.Parameter(torch.zeros_like(source.prompt.detach()))

    def transform(self, hidden: torch.Tensor, live: Live) -> torch.Tensor:
        s, e = live.start, live.end
        added = hidden[:, s:e] + self.prefix.to(hidden.dtype)
        return torch.cat([hidden[:, :s], added, hidden[:, e:]], dim=1)


@register("prefix-propagation", family="additive",
          paper="Li et al., 2023, Prefix Propagation: Parameter-Efficient Tuning for Long Sequences")
@dataclass(frozen=True)
class PrefixPropagationConfig(MethodConfig):
    suggested_lr: ClassVar[float | None] = 0.01
    num_virtual_tokens: int = 20
    init: str = "vocab"  # P_0: vocab | text | random (as prompt tuning)
    init_text_ids: tuple[int, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        check_prompt_fields(self.num_virtual_tokens, self.init, self.init_text_ids, self.targets)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        blocks = layer_paths(model)
        if not blocks:
            raise TargetError(f"prefix-propagation needs a stack of transformer blocks; {type(model).__name__} has none")
        path = input_embedding_path(model)
        init = initial_prompt(model, path, self.num_virtual_tokens, self.init, self.init_text_ids, self.seed)
        source = wrap(model, path, PromptEmbedding, name, init)
        ensure_input_hooks(model, name)
        for i, block in enumerate(blocks[1:], start=1):
            wrap(model, block, PropagatedPrefix, name, source, i)
        return [path, *blocks[1:]]
