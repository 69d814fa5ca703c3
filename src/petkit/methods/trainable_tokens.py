"""Trainable tokens — PEFT's `TrainableTokensConfig` (Hugging Face, 2025): train chosen embedding
rows only (new tokens added to the vocabulary, or existing ones), not the whole embedding matrix.

    e(t) = E[t] + (E_new[k] - E[t])   if t = token_indices[k]    E_new: (K, dim), = E[token_indices]
    e(t) = E[t]                        otherwise                   at init (identity)

(written as a change, so that two adapters on the same rows stack).

K x dim numbers train instead of vocab x dim. Where the output head shares the embedding's weight
(tied embeddings: GPT-2, SmolLM2, ...) the head's logits of those tokens use the new rows too, as
one tied weight would: logit_k = h · E_new[k] (+ bias). The adapter file holds the K rows.
Touches the model's input embedding (default) or the named Embedding layers. Mergeable: the
rows are written into the weight (a tied head follows, as it shares that weight). Names follow
PEFT (`trainable_tokens_delta`: the new rows themselves, not differences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.delta import DeltaModule, canonical_modules, innermost, iter_deltas, wrap
from ..core.errors import ConfigError, TargetError
from ..core.capabilities import PeftLayout
from .family.peft_fields import need
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import match_targets
from .family.dense import remembered


class TokenRows(DeltaModule):
    """An Embedding whose rows `token_indices` are replaced by trained ones."""

    def __init__(self, base: nn.Module, adapter_name: str, token_indices: tuple[int, ...]) -> None:
        super().__init__(base, adapter_name)
        weight = innermost(base).weight
        if max(token_indices) >= weight.shape[0]:
            raise ConfigError(f"--method.token_indices: {max(token_indices)} is outside the vocabulary "
                              f"of {weight.shape[0]} rows")
        index = torch.tensor(token_indices, device=weight.device)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(len(token_indices), device=weight.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("slot", slot, persistent=False)  # token id -> row of E_new, or -1
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[index].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        if not self.enabled:
            return y
        slot = self.slot[ids]
        change = self.trainable_tokens_delta - innermost(self.base).weight.detach()[self.index]
        return y + change[slot.clamp(min=0)].to(y.dtype) * (slot >= 0).unsqueeze(-1).to(y.dtype)

    def row_change(self) -> torch.Tensor:
        """E_new - E[token_indices], detached."""
        return self.trainable_tokens_delta.detach() - innermost(self.base).weight.detach()[self.index]

    def delta_weight(self) -> torch.Tensor:
        weight = innermost(self.base).weight
        return remembered(self, lambda: torch.zeros_like(weight).index_copy(0, self.index, self.row_change()))


class TiedTokenLogits(DeltaModule):
    """The output head tied to a TokenRows embedding: its logits of those tokens use the new rows.

    Holds no tensors of its own (it reads the embedding wrapper's rows); merging adds nothing
    here, since merging the embedding already changes the shared weight.
    """

    def __init__(self, base: nn.Module, adapter_name: str, rows: TokenRows) -> None:
        super().__init__(base, adapter_name)
        self.__dict__["rows"] = rows  # not a sub-module: its parameter belongs to the embedding

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        if not self.enabled:
            return y
        rows = self.rows
        extra = h @ (rows.trainable_tokens_delta - innermost(rows.base).weight.detach()[rows.index]).to(h.dtype).T
        return y.index_add(-1, rows.index, extra)

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros_like(innermost(self.base).weight)


def input_embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = innermost(get()) if callable(get) else None
    path = next((p for p, _, m in canonical_modules(model) if p and m is embedding), None)
    if path is None:
        raise TargetError(f"{type(model).__name__} has no input embedding (get_input_embeddings); "
                          f"name the Embedding layers with --method.targets")
    return path


def tied_heads(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Paths of Linear layers that share `embedding`'s weight (a tied output head)."""
    return [p for p, _, m in canonical_modules(model)
            if p and isinstance(m, nn.Linear) and m.weight is embedding.weight]


def _tied_rows(model: nn.Module, name: str, state: dict) -> tuple[dict, dict]:
    """PeftLayout.params_to_peft: the rows again under each tied output head, as PEFT saves them
    (PEFT reports the head's copy as a missing key when it is absent)."""
    heads = {f"base_model.model.{path}.trainable_tokens_delta": w.rows.trainable_tokens_delta.detach().clone()
             for path, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, TiedTokenLogits)}
    return state, heads


PEFT = PeftLayout(
    "TRAINABLE_TOKENS", {"trainable_tokens_delta": "trainable_tokens_delta"},
    to_peft=lambda c: {"token_indices": list(c.token_indices), "init_weights": True},
    from_peft=lambda d: {"token_indices": [int(t) for t in need(d, "token_indices")]},
    skip=lambda key, d: _tied_copy(key, d), params_to_peft=_tied_rows, modules_to_save=False)


def _tied_copy(key: str, peft_config: dict) -> bool:
    """PEFT also saves the rows under a tied output head (not among its target_modules): petkit
    ties the head itself, so that copy is not read."""
    module = key.rsplit(".", 1)[0]
    targets = peft_config.get("target_modules") or ()
    return isinstance(targets, list) and not any(module == t or module.endswith("." + t) for t in targets)

@register("trainable-tokens", family="selective",
          paper="Hugging Face PEFT, 2025, TrainableTokens: train selected embedding rows")
@dataclass(frozen=True)
class TrainableTokensConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    token_indices: tuple[int, ...] = ()  # the token ids whose rows train (e.g. ids of added tokens)

    def validate(self) -> None:
        if not self.token_indices:
            raise ConfigError("token_indices must name at least one token id (--method.token_indices 5 6 7)")
        for t in self.token_indices:
            check_range("token_indices", t, 0, kind=int)
        if len(set(self.token_indices)) != len(self.token_indices):
            raise ConfigError(f"token_indices holds repeated ids: {list(self.token_indices)}")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        is_embedding = lambda m: isinstance(m, nn.Embedding)  # noqa: E731
        targets = self.targets if self.targets is not None else [input_embedding_path(model)]
        paths = match_targets(model, targets, accept=is_embedding, what="Embedding")
        for path in paths:  # a tied head holds nothing of its own: not among the touched paths
            rows = wrap(model, path, TokenRows, name, self.token_indices)
            for head in tied_heads(model, innermost(rows.base)):
                wrap(model, head, TiedTokenLogits, name, rows)
        return paths
