"""Training objectives: how a batch becomes a loss and (for classification) predictions.

Two strategies, chosen once by `make_objective`, so the loop and `evaluate` never branch on it:

- `ModelLoss`: the model computes its own loss from `labels` (causal-LM instruction tuning with
  -100 on the prompt; an encoder with a classification head). Predictions come from `.logits`
  argmax when the logits are (B, C) class scores.
- `Verbaliser`: classification on a decoder with no new head. The next-token logits at the last
  non-pad position, restricted to the label words' token ids, are the class scores;
  loss = cross-entropy against the class index.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class ObjectiveOutput:
    """Loss (with graph when grads are on) and, for classification, predicted class indices."""

    loss: torch.Tensor
    predictions: torch.Tensor | None
    targets: torch.Tensor | None


class Objective(Protocol):
    """Turns a model and a collated batch into an `ObjectiveOutput`."""

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Run the forward pass for `batch`."""
        ...


def _model_inputs(batch: Batch) -> Batch:
    """The keys a HF model's forward takes (drops e.g. bookkeeping columns); images: pixel_values."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
    return {k: v for k, v in batch.items() if k in keys}


class ModelLoss:
    """The model's own `.loss` from `labels`; accuracy when logits are (B, C)."""

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Forward with labels; class predictions when the labels are one per example."""
        labels = batch["labels"]
        out = model(**_model_inputs(batch), labels=labels)
        logits = out.logits
        is_cls = labels.dim() == 1 and logits.dim() == 2
        preds = logits.argmax(dim=-1) if is_cls else None
        return ObjectiveOutput(out.loss, preds, labels if is_cls else None)


@functools.lru_cache(maxsize=64)
def _accepts_logits_to_keep(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


class Verbaliser:
    """Class scores = next-token logits of the label words at the last non-pad position."""

    def __init__(self, label_token_ids: list[int]) -> None:
        """`label_token_ids[c]` is the token id whose logit scores class `c`."""
        self.label_token_ids = torch.tensor(label_token_ids, dtype=torch.long)

    def class_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, C) scores. Right padding: the last real token sits at `mask.sum() - 1`."""
        mask = batch["attention_mask"]
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        inputs = _model_inputs(batch)
        if _accepts_logits_to_keep(type(model)):
            # Only project the one needed position onto the (large) vocabulary.
            out = model(**inputs, logits_to_keep=last.unsqueeze(1))
            token_logits = out.logits.reshape(len(last), -1)
        else:
            logits = model(**inputs).logits
            token_logits = logits[torch.arange(len(last), device=logits.device), last]
        return token_logits[:, self.label_token_ids.to(token_logits.device)].float()

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Cross-entropy of the label-word scores against the class index."""
        scores = self.class_logits(model, batch)
        labels = batch["labels"]
        return ObjectiveOutput(F.cross_entropy(scores, labels), scores.argmax(dim=-1), labels)


def make_objective(label_token_ids: list[int] | None) -> Objective:
    """`Verbaliser` when label token ids are given, else `ModelLoss`."""
    return ModelLoss() if label_token_ids is None else Verbaliser(list(label_token_ids))
