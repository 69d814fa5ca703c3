"""Soft-prompt fields shared by the input-extending prompt methods (prompt, residual prompt).

`check_prompt_fields` validates the four fields those configs share; `initial_prompt` builds
the (n, hidden) starting embeddings: random vocabulary rows ("vocab"), the embeddings of a text
repeated/cut to n ("text"), or N(0, 0.02) ("random").
"""
from __future__ import annotations

import torch
from torch import nn

from petkit.core.delta import get_canonical, innermost
from petkit.core.errors import ConfigError
from petkit.core.registry import check_choice, check_range

INITS = ("vocab", "text", "random")


def check_prompt_fields(num_virtual_tokens: int, init: str, init_text_ids: tuple[int, ...],
                        targets: object) -> None:
    """Raise ConfigError for a bad prompt length, init mode, missing init text or targets."""
    check_range("num_virtual_tokens", num_virtual_tokens, 1, kind=int)
    check_choice("init", init, INITS)
    if init == "text" and not init_text_ids:
        raise ConfigError("init='text' needs init_text_ids (the token ids of the initial prompt text)")
    if targets is not None:
        raise ConfigError("prompt methods place their tokens at the input; targets must be None")


def initial_prompt(model: nn.Module, embedding_path: str, num_virtual_tokens: int, init: str,
                   init_text_ids: tuple[int, ...], seed: int) -> torch.Tensor:
    """(num_virtual_tokens, hidden) starting prompt, in the embedding's dtype and device."""
    weight = innermost(get_canonical(model, embedding_path)).weight.detach()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and num_virtual_tokens >= limit:
        raise ConfigError(f"num_virtual_tokens={num_virtual_tokens} must be < the model's context ({limit})")
    gen = torch.Generator().manual_seed(seed)
    if init == "vocab":
        rows = torch.randint(0, weight.shape[0], (num_virtual_tokens,), generator=gen)
        return weight[rows.to(weight.device)]
    if init == "text":
        ids = torch.tensor(init_text_ids, device=weight.device)
        if int(ids.max()) >= weight.shape[0] or int(ids.min()) < 0:
            raise ConfigError(f"init_text_ids must be < vocab size {weight.shape[0]}")
        return weight[ids.repeat(num_virtual_tokens // len(ids) + 1)[:num_virtual_tokens]]
    return torch.randn(num_virtual_tokens, weight.shape[1], generator=gen).to(weight) * 0.02
