"""Causal-LM loss that never materialises the [tokens, vocab] fp32 logits.

`HeadBypass` is installed on a Hugging Face causal LM for a run: the output head returns its
input (the hidden states) and the model's `loss_function` becomes `chunked_cross_entropy`, which
projects `chunk` tokens at a time onto the vocabulary under non-reentrant checkpointing, so one
chunk's logits exist at a time in the forward and again in the backward. The model's own
`forward(..., labels=...)` still runs, so label shifting, prompt methods' extra positions and
the model's hooks behave as before. The verbaliser uses `label_logits`: only the label words'
rows of the head at the one position that scores the class.

    loss = sum_i CE(head(h_i), y_i) / #{i : y_i != ignore}     (0, with zero gradient, when all
                                                              labels are ignored: dense gives NaN)

A model whose forward changes the logits after the head (soft-capping, scaling) would give a
different loss, so `HeadBypass.verify` compares both losses on a slice of the first batch and
the run falls back to the dense loss, with a warning, when they differ.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOGIT_BYTES = 2**26  # fp32 bytes of one chunk's logits (64 MiB): chunk = this / (4 * vocab)


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits take about 64 MiB (at least 128 tokens)."""
    return max(128, LOGIT_BYTES // (4 * vocab_size))


Head = Callable[[torch.Tensor], torch.Tensor]


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Head,
                    ignore_index: int) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor,
                          head: Callable[[torch.Tensor], torch.Tensor], chunk: int,
                          ignore_index: int = IGNORE_INDEX,
                          num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` against `labels` (hidden [N, H], labels [N]), `chunk`
    tokens at a time; divided by `num_items` when given (gradient accumulation across batches)."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    part = functools.partial(_chunk_loss_sum, head=head, ignore_index=ignore_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(part, h, y, use_reentrant=False)
        else:
            total = total + part(h, y)
    return _mean(total, labels, ignore_index, num_items)


def _mean(total: torch.Tensor, labels: torch.Tensor, ignore_index: int,
          num_items: torch.Tensor | int | None) -> torch.Tensor:
    """`total` over the counted labels (or `num_items`), at least 1."""
    count = (labels != ignore_index).sum() if num_items is None else num_items
    if isinstance(count, torch.Tensor):
        return total / count.clamp(min=1).to(total.device)
    return total / max(int(count), 1)


@functools.lru_cache(maxsize=64)
def _forward_params(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def can_bypass(model: nn.Module) -> bool:
    """A Hugging Face causal LM: an output head, a settable `loss_function`, `logits_to_keep`."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return (isinstance(head, nn.Module) and hasattr(type(model), "loss_function")
            and "logits_to_keep" in _forward_params(type(model)))


class HeadBypass:
    """While active: the head passes hidden states through and the loss is chunked."""

    def __init__(self, model: nn.Module, chunk: int | None = None) -> None:
        """`chunk` tokens per chunk; None sizes it from the vocabulary (`default_chunk`)."""
        self.model = model
        self.head: nn.Module = model.get_output_embeddings()
        vocab = getattr(self.head, "out_features", None) or model.config.vocab_size
        self.chunk = chunk or default_chunk(int(vocab))
        self.project = self.head.forward  # the real head (a petkit wrapper's forward included)
        self.active = False
        # a fused linear cross-entropy (hidden, weight, labels, bias, ignore_index) -> summed
        # loss, used instead of the chunks when set (training.liger's `flce`)
        self.fused: Callable[..., torch.Tensor] | None = None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
             num_items_in_batch: torch.Tensor | int | None = None,
             ignore_index: int = IGNORE_INDEX, shift_labels: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
        """Drop-in for transformers' `ForCausalLMLoss`; `logits` are the hidden states here."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(logits.device)
        if self.fused is not None:
            hidden, flat = logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1)
            total = self.fused(hidden, self.head.weight, flat, self.head.bias, ignore_index)
            return _mean(total.float(), flat, ignore_index, num_items_in_batch)
        return chunked_cross_entropy(logits, shift_labels, self.project,
                                     self.chunk, ignore_index, num_items_in_batch)

    def label_logits(self, hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the label words only, from hidden states (B, H)."""
        if type(self.head) is nn.Linear:
            bias = None if self.head.bias is None else self.head.bias[label_ids]
            return F.linear(hidden, self.head.weight[label_ids], bias)
        return self.project(hidden)[:, label_ids]

    @contextlib.contextmanager
    def installed(self) -> Iterator[HeadBypass]:
        """The bypass for the duration of the context; the model is as before afterwards."""
        had_loss = "_loss_function" in vars(self.model)
        old_loss = vars(self.model).get("_loss_function")
        had_forward = "forward" in vars(self.head)
        self.head.forward = _identity
        self.model.loss_function = self.loss
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            if had_forward:
                self.head.forward = self.project
            else:
                del self.head.forward
            if had_loss:
                self.model.loss_function = old_loss
            else:
                del self.model._loss_function

    @torch.no_grad()
    def verify(self, batch: dict[str, torch.Tensor],
               forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
               tokens: int = 32) -> bool:
        """Chunked loss == dense loss on `tokens` tokens of the first row (eval mode): its first
        ones, or its last ones when the first are all ignored (an instruction's prompt)."""
        labels = batch.get("labels")
        cut = slice(0, tokens)
        head_ignored = labels is not None and labels.dim() == 2 \
            and bool((labels[0, :tokens] == IGNORE_INDEX).all())
        if head_ignored:
            cut = slice(max(labels.shape[1] - tokens, 0), labels.shape[1])
        piece = {k: v[:1, cut] if v.dim() == 2 else v[:1] for k, v in batch.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            dense = float(forward(piece))
            with self.installed():
                chunked = float(forward(piece))
        finally:
            self.model.train(was_training)
        same = abs(dense - chunked) <= 1e-2 * (1 + abs(dense)) or (dense != dense and chunked == 0)
        if not same:
            warnings.warn(f"chunked loss {chunked:.5f} != the model's own {dense:.5f} on "
                          f"{type(self.model).__name__}: using the dense loss", stacklevel=2)
        return same


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
