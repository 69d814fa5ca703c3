"""Turn examples into token ids, and batches into padded tensors.

Classification: ``{"input_ids", "attention_mask", "labels": int}``. With a verbaliser template
(``"Review: {text}\\nSentiment:"``) a decoder reads the label word as its next token, so truncation
shortens the *text* and always keeps the template's suffix. Instruction: prompt (through the
tokenizer's chat template when it has one) + answer + eos; labels are -100 on the prompt, so the
loss is on the answer only. `collate` pads on the right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from petkit.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    """All of `text`'s ids (petkit cuts to max_length itself: no "longer than the maximum
    sequence length ... indexing errors" warning for a long review)."""
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _cut_text(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int) -> str:
    """The longest prefix of `text` that is about its first n_tokens tokens."""
    if n_tokens <= 0:
        return ""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
        return text if n_tokens >= len(offsets) else text[: offsets[n_tokens - 1][1]]
    return tokenizer.decode(_ids(tokenizer, text, False)[:n_tokens])


def _encode_templated(
    tokenizer: PreTrainedTokenizerBase, text: str, template: str, max_length: int
) -> list[int]:
    """Token ids of template.format(text) within max_length, shortening only the text."""
    ids = _ids(tokenizer, template.replace("{text}", text), True)
    if len(ids) <= max_length:
        return ids
    n_text = len(_ids(tokenizer, text, False))
    budget = n_text - (len(ids) - max_length)
    # Token boundaries can shift where text meets template: shrink until it fits.
    while True:
        ids = _ids(tokenizer, template.replace("{text}", _cut_text(tokenizer, text, budget)), True)
        if len(ids) <= max_length:
            return ids
        if budget <= 0:
            raise ConfigError(
                f"max_length={max_length} is shorter than the template {template!r} alone "
                f"({len(ids)} tokens)"
            )
        budget -= max(1, len(ids) - max_length)


def encode_classification(
    examples: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    template: str | None = None,
) -> list[dict]:
    """Each {"text", "label"} -> {"input_ids", "attention_mask", "labels"} (no padding)."""
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    if template is not None and "{text}" not in template:
        raise ConfigError(f"template must contain '{{text}}', got {template!r}")
    out = []
    for example in examples:
        if template is None:
            enc = tokenizer(example["text"], truncation=True, max_length=max_length)
            ids = list(enc["input_ids"])
        else:
            ids = _encode_templated(tokenizer, example["text"], template, max_length)
        label = int(example["label"])
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label})
    return out


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[int], str]:
    """Prompt ids and the separator to put before the answer text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer, text, False), ""
    ids = _ids(tokenizer, f"Question: {prompt}\nAnswer:", False)
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [bos, *ids]
    return ids, " "


def fit_prompt_answer(prompt: list[int], answer: list[int],
                      max_length: int) -> tuple[list[int], list[int]]:
    """Trim to max_length: the answer keeps at least half; the prompt loses its start first."""
    n_answer = min(len(answer), max(max_length - len(prompt), max_length // 2))
    n_prompt = max_length - n_answer
    return prompt[max(0, len(prompt) - n_prompt):], answer[:n_answer]


def encode_instruction(
    examples: list[dict], tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> list[dict]:
    """Each {"prompt", "completion"} -> ids with labels -100 on the prompt; loss on answer + eos."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    out = []
    for example in examples:
        prompt, sep = _prompt_ids(tokenizer, example["prompt"])
        answer = _ids(tokenizer, sep + example["completion"], False)
        if eos is not None:
            answer.append(eos)
        prompt, answer = fit_prompt_answer(prompt, answer, max_length)
        ids = prompt + answer
        labels = [IGNORE_INDEX] * len(prompt) + answer
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def _as_list(value: object, field: str) -> list:
    """A sequence field as a list of ints: lists, tuples, 1-D tensors and numpy arrays."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy.ndarray
        value = value.tolist()  # type: ignore[union-attr]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"example field {field!r} must be a list or 1-D tensor of token ids, "
                          f"got {type(value).__name__}")
    return list(value)


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: labels (B,) for classification or (B, T) padded with -100 for LM.

    Fields may be lists or tensors; `attention_mask` defaults to ones when absent."""
    if not batch:
        raise ConfigError("cannot collate an empty batch")
    ids = [_as_row(b["input_ids"], "input_ids") for b in batch]
    width = max(len(i) for i in ids)
    out = {"input_ids": _padded(ids, width, pad_id),
           "attention_mask": _padded([_as_row(b["attention_mask"], "attention_mask")
                                      if "attention_mask" in b else torch.ones_like(i)
                                      for b, i in zip(batch, ids)], width, 0)}
    if "labels" in batch[0]:
        labels = [b["labels"] for b in batch]
        if all(isinstance(x, (int, float)) or getattr(x, "ndim", 1) == 0 for x in labels):
            out["labels"] = torch.tensor([int(x) for x in labels], dtype=torch.long)
        else:
            out["labels"] = _padded([_as_row(x, "labels") for x in labels], width, IGNORE_INDEX)
    return out


def _as_row(value: object, field: str) -> torch.Tensor:
    """A sequence field as a 1-D long tensor (tensors are not round-tripped through lists)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.long()
    return torch.tensor(_as_list(value, field), dtype=torch.long)


def _padded(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    """(len(rows), width) long tensor: each row, then `value` up to `width`."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, label_words: tuple[str, ...] | list[str]
) -> list[int]:
    """First token id of each verbaliser word; ConfigError if a word is empty or two collide."""
    ids: list[int] = []
    for word in label_words:
        tokens = _ids(tokenizer, word, False)
        if not tokens:
            raise ConfigError(f"label word {word!r} encodes to no tokens")
        if tokens[0] in ids:
            other = label_words[ids.index(tokens[0])]
            raise ConfigError(
                f"label words {other!r} and {word!r} share their first token ({tokens[0]}); "
                "labels read as next-token words must start differently: rename them, or "
                "train a classification head (--head / data.task_type=head)"
            )
        ids.append(tokens[0])
    return ids
