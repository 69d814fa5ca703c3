"""Residual prompt tuning — Razdaibiedina et al., 2023, "Residual Prompt Tuning: Improving Prompt
Tuning with Residual Reparameterization" (Findings of ACL 2023, arXiv:2305.03937).

    P' = P + LN(W_up ReLU(W_down P))          one shallow MLP shared by the n prompt tokens
    input embeddings  [e(x_1) .. e(x_L)]  ->  [p'_1 .. p'_n, e(x_1) .. e(x_L)]

Prompt tuning (`methods/prompt.py`) whose n trainable embeddings P (n, hidden) pass through a
bottleneck MLP with a residual connection before they are prepended; P, W_down, W_up and the
LayerNorm train. P starts like prompt tuning's ("vocab" | "text" | "random"). The MLP only
reparameterises the prompt: after training `folded_prompt()` gives P', which plain prompt tuning
can use with no MLP. `branch_init="zero"` starts the residual branch at 0 (the LayerNorm's scale,
or W_up without one), so P' = P at first: a text-initialised prompt then starts as that text
(with the paper's init the LayerNorm adds O(1) values, far above a small model's embeddings).
Masks, labels, positions and cached generation are handled by `methods.family.virtual_tokens`. Not mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.delta import wrap
from .family.virtual_tokens import InputExtension, ensure_input_hooks, input_embedding_path
from .family.prompt_init import check_prompt_fields, initial_prompt
from ..core.registry import MethodConfig, check_choice, check_range, register


class ResidualPromptEmbedding(InputExtension):
    def __init__(self, base: nn.Module, adapter_name: str, init: torch.Tensor, bottleneck: int,
                 layer_norm: bool, zero_branch: bool = False) -> None:
        super().__init__(base, adapter_name)
        hidden = init.shape[1]
        kw = {"dtype": init.dtype, "device": init.device}
        self.prompt = nn.Parameter(init.clone())
        self.down = nn.Linear(hidden, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, hidden, **kw)
        self.norm = nn.LayerNorm(hidden, **kw) if layer_norm else nn.Identity()
        if zero_branch:  # P' = P at init; the scale (or W_up) still gets a gradient
            nn.init.zeros_(self.norm.weight if layer_norm else self.up.weight)
            if not layer_norm:
                nn.init.zeros_(self.up.bias)

    def folded_prompt(self) -> torch.Tensor:
        """P' = P + LN(W_up ReLU(W_down P)), shape (n, hidden)."""
        return self.prompt + self.norm(self.up(torch.relu(self.down(self.prompt))))

    def virtual_tokens(self, batch: int) -> torch.Tensor:
        return self.folded_prompt().unsqueeze(0).expand(batch, -1, -1)


@register("residual-prompt", family="additive",
          paper="Razdaibiedina et al., 2023, Residual Prompt Tuning: Improving Prompt Tuning with Residual Reparameterization")
@dataclass(frozen=True)
class ResidualPromptConfig(MethodConfig):
    suggested_lr: ClassVar[float | None] = 0.01  # the MLP branch: 3e-2 overshoots (0.56 on rotten-tomatoes)
    num_virtual_tokens: int = 20
    init: str = "vocab"  # vocab | text | random
    init_text_ids: tuple[int, ...] = ()  # token ids of the init text (tokenise with your tokenizer)
    seed: int = 0
    bottleneck: int = 128  # width of the reparameterisation MLP
    layer_norm: bool = True  # LayerNorm on the MLP's output (as in the paper)
    branch_init: str = "default"  # default (the paper's) | zero: the residual branch starts at 0

    def validate(self) -> None:
        check_prompt_fields(self.num_virtual_tokens, self.init, self.init_text_ids, self.targets)
        check_range("bottleneck", self.bottleneck, 1, kind=int)
        check_choice("layer_norm", self.layer_norm, (True, False))
        check_choice("branch_init", self.branch_init, ("default", "zero"))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        path = input_embedding_path(model)
        init = initial_prompt(model, path, self.num_virtual_tokens, self.init, self.init_text_ids, self.seed)
        with torch.random.fork_rng(devices=[]):  # the MLP's init is seeded, the global RNG untouched
            torch.manual_seed(self.seed)
            wrap(model, path, ResidualPromptEmbedding, name, init, self.bottleneck, self.layer_norm,
                 self.branch_init == "zero")
        ensure_input_hooks(model, name)
        return [path]
