"""Visual prompt tuning (VPT) — Jia et al., 2022, "Visual Prompt Tuning" (ECCV 2022,
arXiv:2203.12119).

n learnable d-wide tokens join the token sequence of a frozen vision transformer, after its
embeddings (patch projection + position embeddings) and before block 0:

    shallow (deep=False):  x_1 = B_0([P, cls, E])          P (n, d): the only new tokens
                           x_i+1 = B_i(x_i)                 they travel through every block
    deep (deep=True):      x_i+1 = B_i([P_i, cls_i, E_i])   block i drops what block i-1 made of
                                                            the prompt and takes its own P_i

The last block drops the n positions, so the final norm and the head (DINOv2: [CLS ; mean of the
patches]) see exactly the base model's layout. Attention in a ViT block has no mask and no
positional term, so where the tokens sit is free; petkit keeps them in front. Several VPT
adapters stack: a wrapper moves its own tokens to the end before calling the block it wraps (an
inner adapter then finds its tokens in front) and back afterwards. Init: uniform in
+-sqrt(6 / (3 p^2 + d)) (the paper's Xavier bound over the patch projection, p = patch side).
Wraps block 0 and the last block (shallow) or every block (deep); parameters: n d (shallow) or
L n d (deep). Not mergeable; not the identity at init (tokens are added). Needs a ViT
(``config.patch_size``); for text models use ``prompt`` or ``prefix``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .family import layer_prompts as lt
from ..core.blocks import layer_paths
from ..core.delta import DeltaModule, get_canonical, innermost, wrap
from ..core.errors import ConfigError, TargetError
from ..core.registry import MethodConfig, check_range, register


def _on_hidden(output: Any, edit: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `edit` to a block's hidden-state output (a tensor, or a tuple led by one)."""
    if isinstance(output, tuple):
        return (edit(output[0]), *output[1:])
    return edit(output)


class VptBlock(DeltaModule):
    """Wraps one ViT block: brings in this adapter's tokens (own `prompt`) or carries them."""

    def __init__(self, base: nn.Module, adapter_name: str, n: int, prompt: torch.Tensor | None,
                 insert: bool, strip: bool, dropout: float) -> None:
        super().__init__(base, adapter_name)
        self.n, self.insert, self.strip = n, insert, strip
        self.prompt = nn.Parameter(prompt) if prompt is not None else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base(*args, **kwargs)
        bound = lt.bind_call(innermost(self.base), args, kwargs)
        if lt.get_arg(bound, "attention_mask") is not None:
            raise ConfigError("vpt supports blocks without an attention mask (vision "
                              "transformers); this forward passed one")
        hidden = lt.get_arg(bound, "hidden_states")
        n = self.n
        if self.prompt is not None:  # bring in this block's tokens (deep: replacing the old)
            tokens = self.dropout(self.prompt).to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            rest = hidden if self.insert else hidden[:, n:]
        else:
            tokens, rest = hidden[:, :n], hidden[:, n:]
        lt.set_arg(bound, "hidden_states", torch.cat([rest, tokens], dim=1))
        out = lt.call(self.base, bound)
        if self.strip:
            return _on_hidden(out, lambda h: h[:, : h.shape[1] - n])
        return _on_hidden(out, lambda h: torch.cat([h[:, -n:], h[:, :-n]], dim=1))


@register("vpt", family="additive", paper="Jia et al., 2022, Visual Prompt Tuning")
@dataclass(frozen=True)
class VptConfig(MethodConfig):
    applies_to: ClassVar[tuple[str, ...]] = ("vision",)
    suggested_lr: ClassVar[float | None] = 0.01
    num_virtual_tokens: int = 10
    deep: bool = False  # tokens at every block (VPT-deep) or at the input only (VPT-shallow)
    dropout: float = 0.0  # dropout on the prompt tokens
    seed: int = 0  # seeds the tokens' init

    def validate(self) -> None:
        check_range("num_virtual_tokens", self.num_virtual_tokens, 1, kind=int)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.deep, bool):
            raise ConfigError(f"deep must be true or false, got {self.deep!r}")
        if self.targets is not None:
            raise ConfigError("vpt places its tokens by `deep` (input or every block); "
                              "targets must be None")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        config = getattr(model, "config", None)
        patch, hidden = getattr(config, "patch_size", None), getattr(config, "hidden_size", None)
        if patch is None or not isinstance(hidden, int):
            raise TargetError(f"vpt needs a vision transformer (config.patch_size and "
                              f"config.hidden_size); {type(model).__name__} has none: for text "
                              f"models use 'prompt' or 'prefix'")
        stack = layer_paths(model)
        if not stack:
            raise TargetError(f"vpt found no transformer blocks in {type(model).__name__}")
        area = patch * patch if isinstance(patch, int) else math.prod(patch)
        bound = math.sqrt(6.0 / (3 * area + hidden))
        ref = next(innermost(get_canonical(model, stack[0])).parameters())
        count = len(stack) if self.deep else 1
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
            torch.manual_seed(self.seed)
            prompts = [torch.empty(self.num_virtual_tokens, hidden, dtype=ref.dtype,
                                   device=ref.device).uniform_(-bound, bound) for _ in range(count)]
        last = len(stack) - 1
        touched = [i for i in range(len(stack)) if i < count or i == last]
        for i in touched:
            wrap(model, stack[i], VptBlock, name, self.num_virtual_tokens,
                 prompts[i] if i < count else None, i == 0, i == last, self.dropout)
        return [stack[i] for i in touched]
