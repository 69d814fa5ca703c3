"""Packing for causal-LM / instruction data: several examples per row, no padding between them.

A micro-batch's examples are laid end to end, first fit in order, into rows of `length` tokens
(default: the longest example). `position_ids` restart at 0 for every example and there is no
`attention_mask`: transformers then builds a block-diagonal causal mask from the position ids
(its packed-sequence path; flash-attention's varlen kernels read them the same way), so no token
attends across an example boundary. Each example's first label is ignored, as the unpacked loss
never predicts it; the tail of a row is padding with ignored labels and its own positions.
The mean over predicted tokens is then the same as the padded batch's.
"""

from __future__ import annotations

from typing import Any

import torch

from petkit.core.errors import ConfigError
from petkit.training.lm_loss import IGNORE_INDEX


def _ids(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def pack(examples: list[dict[str, Any]], length: int | None = None,
         pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows {"input_ids", "labels", "position_ids"} of `examples` ({"input_ids",
    "labels"?}: labels default to the input ids)."""
    if not examples:
        raise ConfigError("cannot pack an empty batch")
    seqs = []
    for ex in examples:
        ids = _ids(ex["input_ids"])
        labels = _ids(ex["labels"]) if "labels" in ex else list(ids)
        if len(labels) != len(ids):
            raise ConfigError("packing needs token-level labels (one per input id); use "
                              "packing=false for classification data")
        seqs.append((ids, [IGNORE_INDEX] + labels[1:]))
    width = length or max(len(ids) for ids, _ in seqs)
    rows: list[list[tuple[list[int], list[int]]]] = []
    for ids, labels in seqs:
        if len(ids) > width:
            raise ConfigError(f"an example of {len(ids)} tokens is longer than "
                              f"RuntimeConfig.pack_length={width}")
        row = next((r for r in rows if sum(len(i) for i, _ in r) + len(ids) <= width), None)
        if row is None:
            rows.append([(ids, labels)])
        else:
            row.append((ids, labels))
    out_ids, out_labels, out_pos = [], [], []
    for row in rows:
        ids = [t for i, _ in row for t in i]
        labels = [t for _, lab in row for t in lab]
        pos = [p for i, _ in row for p in range(len(i))]
        pad = width - len(ids)
        out_ids.append(ids + [pad_id] * pad)
        out_labels.append(labels + [IGNORE_INDEX] * pad)
        out_pos.append(pos + list(range(pad)))
    return {"input_ids": torch.tensor(out_ids, dtype=torch.long),
            "labels": torch.tensor(out_labels, dtype=torch.long),
            "position_ids": torch.tensor(out_pos, dtype=torch.long)}
