"""Evaluation that fits the objective: pair accuracy on preference pairs, a metric on greedy
generations for prompts with references, and the sample table a run writes.

    pair accuracy   share of pairs whose chosen answer has the higher mean token log-probability
                    (objective-free: the same number before and after any objective)
    generation      mean of a metric function (`--metric exact | contains | module:function`,
                    `grpo_rewards.load_scorer`) over greedy completions of the test prompts
    samples         samples.csv and samples.md: prompt, reference, before, after
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petkit.training.grpo import generate_texts
from petkit.training.grpo_rewards import Scorer
from petkit.training.objectives_preference import IGNORE, pair_collate, sequence_logp

SAMPLE_ROWS = 20


@torch.no_grad()
def pair_accuracy(model: nn.Module, pairs: Sequence[dict[str, Any]], pad_id: int,
                  batch_size: int = 8) -> float:
    """Share of encoded pairs whose chosen answer scores a higher mean token log-probability."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pair_collate(list(pairs[start:start + batch_size]), pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False)
            per_token = sequence_logp(out.logits, batch["labels"]) \
                / (batch["labels"][:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
            half = len(per_token) // 2
            wins += int((per_token[:half] > per_token[half:]).sum())
    finally:
        model.train(was_training)
    return wins / max(len(pairs), 1)


def generation_score(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                     rows: Sequence[dict[str, Any]], metric: Scorer,
                     max_new_tokens: int) -> tuple[float, list[str]]:
    """Mean `metric` over greedy completions of `prompts` (token ids), and the completions."""
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens)
    values = metric.score([str(r.get("prompt", "")) for r in rows], texts, list(rows),
                          list(range(len(rows))))
    return sum(values) / max(len(values), 1), texts


def write_samples(folder: Path, rows: Sequence[dict[str, Any]], before: Sequence[str],
                  after: Sequence[str], limit: int = SAMPLE_ROWS) -> list[Path]:
    """samples.csv and samples.md in `folder`: the first `limit` test rows' prompt, reference
    (the chosen answer for preference pairs), and the completions before and after training."""
    table = [{"prompt": str(r.get("prompt", "")),
              "reference": str(r.get("reference", r.get("chosen", ""))),
              "before": b, "after": a} for r, b, a in zip(rows[:limit], before, after)]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "reference", "before", "after"])
        writer.writeheader()
        writer.writerows(table)
    cell = lambda text: " ".join(text.split()).replace("|", "\\|")  # noqa: E731
    lines = ["| prompt | reference | before | after |", "|---|---|---|---|"]
    lines += [f"| {cell(t['prompt'])} | {cell(t['reference'])} | {cell(t['before'])} | "
              f"{cell(t['after'])} |" for t in table]
    (folder / "samples.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [folder / "samples.csv", folder / "samples.md"]
