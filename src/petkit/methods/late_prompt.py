"""Late prompt tuning — Liu et al., 2022, "Late Prompt Tuning: A Late Prompt Could Be Better Than
Many Prompts" (Findings of EMNLP 2022, arXiv:2210.11292).

An instance-dependent prompt is generated from the hidden states H (B, L, d) entering block k and
prepended there; blocks 0..k-1 never see it:

    P = W_up act(Pool_n(W_down H))       (B, n, d)   Pool_n: adaptive avg/max pooling of the
                                                     non-padding tokens into n segments
    block k input   [h_1 .. h_L]  ->  [P_1 .. P_n, h_1 .. h_L]

W_down, W_up (the prompt generator) train. `layer` is k (default: the middle block; it must lie
in [1, number of blocks - 1]). Blocks k..last are wrapped (`methods.family.layer_prompts`): their mask,
rotary position embeddings and position ids are widened by n (prompt rows are causal among
themselves on decoders; the prompt sits at rotary position 0), the last block drops the n
positions, so logits, labels, pooled [CLS] outputs and `generate` line up with the caller's
tokens. With a KV cache the prompt is generated once, from the prompt given to `generate`.
On a decoder the pooled prompt sees the whole input, as in the paper's classification setting.
Not mergeable; not the identity at init (a prompt is added).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .family import layer_prompts as lt
from ..core.delta import DeltaModule, get_canonical, innermost, wrap
from ..core.errors import ConfigError, TargetError
from ..core.blocks import layer_paths
from ..core.registry import MethodConfig, check_choice, check_range, register

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def segment_weights(keep: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, L) membership of each kept token in n adaptive-pooling segments of its row.

    Row b keeps L_b tokens; segment j holds kept ranks [floor(j L_b / n), ceil((j+1) L_b / n)).
    """
    keep = keep.bool()
    rank = keep.long().cumsum(dim=1) - 1  # (B, L): rank among the kept tokens
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    j = torch.arange(n, device=keep.device)[None, :]
    start = torch.div(j * count, n, rounding_mode="floor")  # (B, n)
    end = torch.div((j + 1) * count + n - 1, n, rounding_mode="floor")
    member = (rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None])
    return member & keep[:, None, :]


class PromptGenerator(nn.Module):
    """P = W_up act(Pool_n(W_down H)) over the tokens `keep` marks."""

    def __init__(self, hidden: int, bottleneck: int, n: int, pooling: str, activation: str,
                 ref: torch.Tensor) -> None:
        super().__init__()
        kw = {"dtype": ref.dtype, "device": ref.device}
        self.down = nn.Linear(hidden, bottleneck, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden, **kw)
        self.n, self.pooling = n, pooling

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        z = self.down(hidden)  # (B, L, m)
        member = segment_weights(keep, self.n)  # (B, n, L)
        if self.pooling == "avg":
            weights = member.to(z.dtype) / member.sum(-1, keepdim=True).clamp(min=1).to(z.dtype)
            pooled = weights @ z
        else:
            masked = z[:, None].masked_fill(~member[..., None], torch.finfo(z.dtype).min)
            pooled = masked.amax(dim=2)
        return self.up(self.act(pooled))


class LateState:
    """Shared by one adapter's wrappers: how many prompt positions this forward carries."""

    def __init__(self) -> None:
        self.n = 0
        self.inserting = False


class LatePromptBlock(DeltaModule):
    """Wraps a block >= k: block k generates and inserts the prompt; every one carries it."""

    def __init__(self, base: nn.Module, adapter_name: str, state: LateState, layer: int,
                 generator: PromptGenerator | None, last: bool) -> None:
        super().__init__(base, adapter_name)
        self.state, self.layer, self.last = state, layer, last
        self.generator = generator
        self.causal = lt.is_causal(innermost(base))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = None
        if self.generator is not None:  # the insertion block decides for this whole forward
            self.state.n = self.generator.n if self.enabled else 0
            if self.state.n:
                bound = lt.bind_call(innermost(self.base), args, kwargs)
                self.state.inserting = lt.cached_length(bound, self.layer) == 0
        n = self.state.n
        if n == 0:
            return self.base(*args, **kwargs)
        bound = bound or lt.bind_call(innermost(self.base), args, kwargs)
        if self.generator is not None and self.state.inserting:
            self._insert(bound)
        lt.extend_call(bound, n, self.state.inserting, self.causal)
        out = lt.call(self.base, bound)
        return lt.strip_front(out, n) if self.last and self.state.inserting else out

    def _insert(self, bound: Any) -> None:
        hidden = lt.get_arg(bound, "hidden_states")
        batch, length = hidden.shape[:2]
        keep = lt.visible_keys(lt.get_arg(bound, "attention_mask"), batch, length, hidden.device)
        prompt = self.generator(hidden, keep).to(hidden.dtype)
        lt.set_arg(bound, "hidden_states", torch.cat([prompt, hidden], dim=1))


@register("late-prompt", family="additive",
          paper="Liu et al., 2022, Late Prompt Tuning: A Late Prompt Could Be Better Than Many Prompts")
@dataclass(frozen=True)
class LatePromptConfig(MethodConfig):
    suggested_lr: ClassVar[float | None] = 0.005
    num_virtual_tokens: int = 10
    layer: int | None = None  # block the prompt enters; None = the middle block
    bottleneck: int = 64  # width of the prompt generator
    pooling: str = "avg"  # avg | max
    activation: str = "relu"
    seed: int = 0  # seeds the generator's init

    def validate(self) -> None:
        check_range("num_virtual_tokens", self.num_virtual_tokens, 1, kind=int)
        if self.layer is not None:
            check_range("layer", self.layer, 1, kind=int)
        check_range("bottleneck", self.bottleneck, 1, kind=int)
        check_choice("pooling", self.pooling, ("avg", "max"))
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if self.targets is not None:
            raise ConfigError("late prompt tuning picks its block with `layer`; targets must be None")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        stack = layer_paths(model)
        if len(stack) < 2:
            raise TargetError(f"late prompt tuning needs a model with >= 2 transformer blocks; "
                              f"{type(model).__name__} has {len(stack)}")
        k = len(stack) // 2 if self.layer is None else self.layer
        if k > len(stack) - 1:
            raise ConfigError(f"layer must be in [1, {len(stack) - 1}] for this model "
                              f"({len(stack)} blocks), got {k}")
        ref = next(innermost(get_canonical(model, stack[k])).parameters())
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
            torch.manual_seed(self.seed)
            generator = PromptGenerator(_hidden_size(model), self.bottleneck, self.num_virtual_tokens,
                                        self.pooling, self.activation, ref)
        state = LateState()
        for i in range(k, len(stack)):
            wrap(model, stack[i], LatePromptBlock, name, state, i, generator if i == k else None,
                 i == len(stack) - 1)
        return stack[k:]


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise TargetError(f"late prompt tuning needs config.hidden_size on {type(model).__name__}")
    return size
