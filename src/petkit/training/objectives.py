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

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from petkit.core.signatures import forward_params
from petkit.training.lm_loss import HeadBypass

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


_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")


def _forward_type(model: nn.Module) -> type:
    """The class whose forward runs (under DDP, training/distributed.py: the wrapped model's)."""
    return type(model.module if isinstance(model, DistributedDataParallel) else model)


def _model_inputs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """The keys a HF model's forward takes (drops e.g. bookkeeping columns; images:
    pixel_values); no key/value cache while training or scoring (transformers would otherwise
    build one in every forward). A model whose forward takes **kwargs gets every input key."""
    params = forward_params(_forward_type(model))
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k in _INPUTS}
    if "position_ids" in inputs and "position_ids" not in params and "kwargs" not in params:
        del inputs["position_ids"]
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


class ModelLoss:
    """The model's own `.loss` from `labels`; accuracy when logits are (B, C)."""

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Forward with labels; class predictions when the labels are one per example."""
        labels = batch["labels"]
        out = model(**_model_inputs(model, batch), labels=labels)
        logits = out.logits
        is_cls = labels.dim() == 1 and logits.dim() == 2
        preds = logits.argmax(dim=-1) if is_cls else None
        return ObjectiveOutput(out.loss, preds, labels if is_cls else None)


class Verbaliser:
    """Class scores = next-token logits of the label words at the last non-pad position."""

    def __init__(self, label_token_ids: list[int], bypass: HeadBypass | None = None) -> None:
        """`label_token_ids[c]` is the token id whose logit scores class `c`; with an active
        `bypass`, only those rows of the output head are computed."""
        self.label_token_ids = torch.tensor(label_token_ids, dtype=torch.long)
        self.bypass = bypass

    def class_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, C) scores. Right padding: the last real token sits at `mask.sum() - 1`."""
        mask = batch["attention_mask"]
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        inputs = _model_inputs(model, batch)
        if "logits_to_keep" in forward_params(_forward_type(model)):
            # Only project the one needed position onto the (large) vocabulary.
            out = model(**inputs, logits_to_keep=last.unsqueeze(1))
            token_logits = out.logits.reshape(len(last), -1)
            if self.bypass is not None and self.bypass.active:  # hidden states: label rows only
                ids = self.label_token_ids.to(token_logits.device)
                return self.bypass.label_logits(token_logits, ids).float()
        else:
            logits = model(**inputs).logits
            token_logits = logits[torch.arange(len(last), device=logits.device), last]
        return token_logits[:, self.label_token_ids.to(token_logits.device)].float()

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Cross-entropy of the label-word scores against the class index."""
        scores = self.class_logits(model, batch)
        labels = batch["labels"]
        return ObjectiveOutput(F.cross_entropy(scores, labels), scores.argmax(dim=-1), labels)


def make_objective(label_token_ids: list[int] | None,
                   bypass: HeadBypass | None = None) -> Objective:
    """`Verbaliser` when label token ids are given, else `ModelLoss` (which a `HeadBypass`
    installed on the model makes chunked)."""
    if label_token_ids is None:
        return ModelLoss()
    return Verbaliser(list(label_token_ids), bypass)
