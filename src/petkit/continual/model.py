"""The model every continual strategy tunes: a frozen encoder, mean pooling, one head per task.

    f(x)    = mean over real tokens of encoder(x).last_hidden_state         (sentence feature)
    logits  = [heads[0](f) | heads[1](f) | ... ]   one block of class scores per task
    masked  : classes of tasks outside `visible` get -1e4 (they cannot be predicted or trained)

So the output layer is one shared head over the union of all tasks' classes, stored as a block
per task; a task's global class index is `offsets[t] + local label`. Each head starts at zero
and belongs to an adapter through `modules_to_save` (`heads.<t>`), so an adapter file carries
the head it was trained with. `penalty`, when set, is added to the training loss (O-LoRA's
orthogonality term): `pk.train`'s objective uses the model's own `.loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petkit.continual.tasks import SeqTask
from petkit.data.encode import collate

MASKED = -1e4


@dataclass
class ClassifierOutput:
    """What `ModelLoss` reads: `.loss` (None without labels) and `.logits` (B, classes)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class ContinualClassifier(nn.Module):
    """Encoder + mean pooling + per-task head blocks with masking of unseen tasks' classes."""

    def __init__(self, encoder: nn.Module, class_counts: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # architecture defaults for targets, fingerprint
        hidden = int(encoder.config.hidden_size)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in class_counts)
        for head in self.heads:  # zero start: the same head on every build, so adapters reload
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.class_counts = list(class_counts)
        self.offsets = [sum(class_counts[:t]) for t in range(len(class_counts))]
        self.visible: list[int] = list(range(len(class_counts)))
        self.penalty: Callable[[], torch.Tensor] | None = None

    def block(self, task: int) -> slice:
        """Columns of the logits that score task `task`'s classes."""
        return slice(self.offsets[task], self.offsets[task] + self.class_counts[task])

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the last hidden states over real (unpadded) tokens: (B, hidden)."""
        if attention_mask is None:  # a batch without padding may come without its mask
            attention_mask = torch.ones_like(input_ids)
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def class_mask(self) -> torch.Tensor:
        """(classes,) True for the classes of `visible` tasks."""
        keep = torch.zeros(sum(self.class_counts), dtype=torch.bool)
        for task in self.visible:
            keep[self.block(task)] = True
        return keep

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ClassifierOutput:
        """Masked logits; cross-entropy (+ `penalty` while training) when labels are given."""
        feats = self.features(input_ids, attention_mask, token_type_ids)
        logits = torch.cat([head(feats) for head in self.heads], dim=-1)
        logits = logits.masked_fill(~self.class_mask().to(logits.device), MASKED)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            if self.training and self.penalty is not None:
                loss = loss + self.penalty()
        return ClassifierOutput(loss, logits)


def build_classifier(model_name: str, class_counts: Sequence[int],
                     encoder: nn.Module | None = None) -> tuple[ContinualClassifier, object]:
    """(classifier, tokenizer) on an embedded / local encoder; pass `encoder` to use your own
    (tokenizer None: examples must already hold token ids)."""
    tokenizer = None
    if encoder is None:
        from petkit.models import load_model

        encoder, tokenizer = load_model(model_name, task="base")
    model = ContinualClassifier(encoder, class_counts)
    model.eval()
    return model, tokenizer


def encode_task(task: SeqTask, offset: int, tokenizer: object, max_length: int
                ) -> tuple[list[dict], list[dict]]:
    """(train, test) as {"input_ids", "attention_mask", "labels": global class index}."""

    def encode(examples: list[dict]) -> list[dict]:
        if not examples:
            return []
        if "input_ids" in examples[0]:  # already token ids (tests, user pipelines)
            return [{"input_ids": list(e["input_ids"]),
                     "attention_mask": [1] * len(e["input_ids"]),
                     "labels": offset + int(e["label"])} for e in examples]
        enc = tokenizer([e["text"] for e in examples], truncation=True,  # type: ignore[operator]
                        max_length=max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": offset + int(e["label"])}
                for ids, mask, e in zip(enc["input_ids"], enc["attention_mask"], examples)]

    return encode(task.train), encode(task.test)


def batches(examples: Sequence[dict], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Collated batches in order (no shuffling), for evaluation and feature extraction."""
    return [collate(list(examples[i:i + size]), pad_id) for i in range(0, len(examples), size)]


@torch.no_grad()
def forward_all(model: ContinualClassifier, examples: Sequence[dict], pad_id: int,
                size: int = 32, features: bool = False) -> torch.Tensor:
    """Logits (N, classes) of the model as it is now, or its pooled features (N, hidden)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in batches(examples, size, pad_id):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out.append(model.features(ids, mask) if features else model(ids, mask).logits)
    model.train(was_training)
    return torch.cat(out).float().cpu()
