"""Checks `train` makes of the model and the data before stepping, so a user's mistake is a
`ConfigError` naming the example or field instead of a raw `KeyError`/`IndexError` from deep
inside torch, or a NaN step.

- a merged adapter cannot be trained (its delta is folded into the base weights);
- every example has `input_ids` (or `pixel_values`/`image`) and `labels`;
- label token ids lie in the model's vocabulary (-100 = ignored), class labels in the classes;
- `TrainConfig.label_token_ids` lie in the vocabulary;
- a step whose micro-batches have every label ignored is skipped (`has_targets`), and counted.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.core.state import active_adapters, wrappers_of
from petkit.training.batching import CollateFn
from petkit.training.evaluate import resolve_collate

IGNORE = -100
_INPUT_KEYS = ("input_ids", "pixel_values", "image")


def check_not_merged(model: nn.Module) -> None:
    """A merged active adapter has no live delta to train: ConfigError naming it."""
    merged = sorted({w.adapter_name for _, w in wrappers_of(model, active_adapters(model)) if w.merged})
    if merged:
        raise ConfigError(f"adapter {merged[0]!r} is merged into the base weights; "
                          "pk.unmerge(model) before training it")


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the output embedding (the vocabulary the logits span), else config.vocab_size."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _classes(model: nn.Module, label_token_ids: list[int] | None) -> int | None:
    if label_token_ids is not None:
        return len(label_token_ids)
    config = getattr(model, "config", None)
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "Classification" in arch or "Classification" in type(model).__name__:
        return getattr(config, "num_labels", None)
    return None


def check_label_token_ids(model: nn.Module, label_token_ids: list[int] | None) -> None:
    """Every verbaliser token id must be a row of the model's vocabulary."""
    vocab = vocab_size(model)
    if label_token_ids is None or vocab is None:
        return
    bad = [i for i in label_token_ids if i >= vocab]
    if bad:
        raise ConfigError(f"TrainConfig.label_token_ids holds token id {bad[0]}, outside the "
                          f"model's vocabulary of {vocab} tokens")


def _as_ints(labels: Any) -> list[int] | None:
    if isinstance(labels, torch.Tensor):
        return labels.reshape(-1).tolist() if labels.dim() else None
    if isinstance(labels, (list, tuple)):
        return list(labels)
    return None


def check_examples(model: nn.Module, data: Sequence[Any], label_token_ids: list[int] | None,
                   split: str) -> None:
    """Keys and label ranges of every example of `data` (a `split` such as "training")."""
    vocab, classes = vocab_size(model), _classes(model, label_token_ids)
    for i, example in enumerate(data):
        if not isinstance(example, Mapping):
            return  # a custom collate_fn reads its own example type
        if not any(k in example for k in _INPUT_KEYS) or "labels" not in example:
            need = "labels" if "labels" not in example else "input_ids"
            raise ConfigError(f"{split} example {i} has no {need!r} key (keys: {sorted(example)}); "
                              "each example needs input_ids (or pixel_values) and labels")
        labels = example["labels"]
        tokens = _as_ints(labels)
        if tokens is None:  # one class label
            if classes is not None and not 0 <= int(labels) < classes:
                raise ConfigError(f"{split} example {i} has label {int(labels)}, outside the "
                                  f"{classes} classes [0, {classes})")
        elif tokens and vocab is not None and (max(tokens) >= vocab or min(tokens) < 0):
            bad = next((t for t in tokens if t >= vocab or (t < 0 and t != IGNORE)), None)
            if bad is not None:
                raise ConfigError(f"{split} example {i} has label token id {bad}, outside the "
                                  f"model's vocabulary [0, {vocab}) (-100 marks ignored tokens)")


def check_inputs(model: nn.Module, train_data: Sequence[Any], eval_data: Sequence[Any] | None,
                 label_token_ids: list[int] | None, collate_fn: CollateFn | None,
                 pad_id: int) -> None:
    """`check_label_token_ids`; `check_examples` of both splits under petkit's collate; the keys
    of one collated batch under a custom `collate_fn`."""
    check_label_token_ids(model, label_token_ids)
    if collate_fn is None:
        check_examples(model, train_data, label_token_ids, "training")
        check_examples(model, eval_data or [], label_token_ids, "validation")
    elif len(train_data):
        batch = resolve_collate(collate_fn, pad_id)([train_data[0]])
        if isinstance(batch, Mapping):
            check_batch_keys(batch, label_token_ids is not None)


def has_targets(batch: Mapping[str, Any]) -> bool:
    """False when every label of a collated micro-batch is ignored (-100): its loss is NaN."""
    labels = batch.get("labels")
    return not isinstance(labels, torch.Tensor) or bool((labels != IGNORE).any())


def check_batch_keys(batch: Mapping[str, Any], needs_mask: bool) -> None:
    """A collated batch must hold labels (and attention_mask for verbaliser scoring)."""
    for key in ("labels",) + (("attention_mask",) if needs_mask else ()):
        if key not in batch:
            raise ConfigError(f"the collated training batch has no {key!r} (keys: {sorted(batch)}); "
                              "the collate_fn must return it")


def usable_batches(batches: Sequence[Mapping[str, Any]], needs_mask: bool) -> list[Any]:
    """The micro-batches of a step that have a target (keys checked first)."""
    mappings = [b for b in batches if isinstance(b, Mapping)]
    for batch in mappings:
        check_batch_keys(batch, needs_mask)
    if len(mappings) < len(batches):  # a custom collate's own batch type: not ours to judge
        return list(batches)
    return [b for b in batches if has_targets(b)]
