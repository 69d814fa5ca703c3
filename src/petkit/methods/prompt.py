"""Prompt tuning — Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".

    input embeddings  [e(x_1) .. e(x_L)]  ->  [p_1 .. p_n, e(x_1) .. e(x_L)]

n trainable virtual-token embeddings P (n, hidden) are prepended to every input; the model is
untouched. P starts from random vocabulary embeddings ("vocab"), from the embeddings of a text
("text", repeated/cut to n) or from N(0, 0.02) ("random"). Attention masks, labels, positions
and cached generation are extended by `core.inputs`. Not mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.delta import get_canonical, innermost, wrap
from ..core.errors import ConfigError
from ..core.inputs import InputExtension, ensure_input_hooks, input_embedding_path
from ..core.registry import MethodConfig, check_choice, check_range, register


class PromptEmbedding(InputExtension):
    def __init__(self, base: nn.Module, adapter_name: str, init: torch.Tensor) -> None:
        super().__init__(base, adapter_name)
        self.prompt = nn.Parameter(init.clone())

    def virtual_tokens(self, batch: int) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(batch, -1, -1)


@register("prompt", family="additive", paper="Lester et al., 2021, The Power of Scale for Parameter-Efficient Prompt Tuning")
@dataclass(frozen=True)
class PromptConfig(MethodConfig):
    num_virtual_tokens: int = 20
    init: str = "vocab"  # vocab | text | random
    init_text_ids: tuple[int, ...] = ()  # token ids of the init text (tokenise with your tokenizer)
    seed: int = 0

    def validate(self) -> None:
        check_range("num_virtual_tokens", self.num_virtual_tokens, 1, kind=int)
        check_choice("init", self.init, ("vocab", "text", "random"))
        if self.init == "text" and not self.init_text_ids:
            raise ConfigError("init='text' needs init_text_ids (the token ids of the initial prompt text)")
        if self.targets is not None:
            raise ConfigError("prompt tuning places its tokens at the input; targets must be None")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        path = input_embedding_path(model)
        emb = innermost(get_canonical(model, path))
        weight = emb.weight.detach()
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and self.num_virtual_tokens >= limit:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens} must be < the model's context ({limit})")
        gen = torch.Generator().manual_seed(self.seed)
        if self.init == "vocab":
            rows = torch.randint(0, weight.shape[0], (self.num_virtual_tokens,), generator=gen)
            init = weight[rows.to(weight.device)]
        elif self.init == "text":
            ids = torch.tensor(self.init_text_ids, device=weight.device)
            if int(ids.max()) >= weight.shape[0] or int(ids.min()) < 0:
                raise ConfigError(f"init_text_ids must be < vocab size {weight.shape[0]}")
            init = weight[ids.repeat(self.num_virtual_tokens // len(ids) + 1)[: self.num_virtual_tokens]]
        else:
            init = torch.randn(self.num_virtual_tokens, weight.shape[1], generator=gen).to(weight) * 0.02
        wrap(model, path, PromptEmbedding, name, init)
        ensure_input_hooks(model, name)
        return [path]
