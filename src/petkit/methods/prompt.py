"""Prompt tuning — Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".

    input embeddings  [e(x_1) .. e(x_L)]  ->  [p_1 .. p_n, e(x_1) .. e(x_L)]

n trainable virtual-token embeddings P (n, hidden) are prepended to every input; the model is
untouched. P starts from random vocabulary embeddings ("vocab"), from the embeddings of a text
("text", repeated/cut to n) or from N(0, 0.02) ("random"). Attention masks, labels, positions
and cached generation are extended by `methods.family.virtual_tokens`. Not mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import PeftLayout
from ..core.delta import wrap
from .family.peft_fields import need
from .family import peft_prompts
from .family.virtual_tokens import InputExtension, ensure_input_hooks, input_embedding_path
from .family.prompt_init import check_prompt_fields, initial_prompt
from ..core.registry import MethodConfig, register


class PromptEmbedding(InputExtension):
    def __init__(self, base: nn.Module, adapter_name: str, init: torch.Tensor) -> None:
        super().__init__(base, adapter_name)
        self.prompt = nn.Parameter(init.clone())

    def virtual_tokens(self, batch: int) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(batch, -1, -1)


# PEFT's "PROMPT_TUNING" on a causal LM: the prompt is its `prompt_embeddings` (n, hidden)
PEFT = PeftLayout(
    "PROMPT_TUNING", {}, to_peft=lambda c: {"num_virtual_tokens": c.num_virtual_tokens, "prompt_tuning_init": "RANDOM"},
    from_peft=lambda d: {"num_virtual_tokens": int(need(d, "num_virtual_tokens")), "init": "random"},
    params_to_peft=lambda model, name, state: peft_prompts.to_peft(model, name, state, PromptEmbedding,
                                                                   lambda w: w.prompt),
    params_from_peft=lambda model, d, tensors: peft_prompts.from_peft(model, d, tensors, "prompt"),
    fields_to_peft=lambda model, name: peft_prompts.task_fields(
        model, peft_prompts.extension(model, name, PromptEmbedding)[1].prompt.shape[1],
        model.config.num_attention_heads),
    fields_from_peft=lambda d, paths: {"targets": None})


@register("prompt", family="additive", paper="Lester et al., 2021, The Power of Scale for Parameter-Efficient Prompt Tuning")
@dataclass(frozen=True)
class PromptConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    suggested_lr: ClassVar[float | None] = 0.03
    num_virtual_tokens: int = 20
    init: str = "vocab"  # vocab | text | random
    init_text_ids: tuple[int, ...] = ()  # token ids of the init text (tokenise with your tokenizer)
    seed: int = 0

    def validate(self) -> None:
        check_prompt_fields(self.num_virtual_tokens, self.init, self.init_text_ids, self.targets)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        path = input_embedding_path(model)
        init = initial_prompt(model, path, self.num_virtual_tokens, self.init, self.init_text_ids, self.seed)
        wrap(model, path, PromptEmbedding, name, init)
        ensure_input_hooks(model, name)
        return [path]
