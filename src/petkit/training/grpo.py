"""GRPO (Shao et al., 2024, DeepSeekMath): sample a group of G completions per prompt, score them
with reward functions, and raise the likelihood of the better-than-their-group ones.

For prompt x with completions o_1..o_G and rewards r_i, the advantage of every token of o_i is
A_i = (r_i - mean(r)) / (std(r) + 1e-4). One update per sampled batch (on-policy, so the ratio
pi / pi_old is 1 and only its gradient acts), with the k3 estimate of KL(pi || ref) per token:

    loss = mean_i 1/|o_i| sum_t [ -A_i * pi(o_it) / sg(pi(o_it)) + kl * (ref/pi - log(ref/pi) - 1) ]

where ref is the model inside `pk.disabled` (every adapter off: no second copy of the weights).
`GRPOObjective` is an `Objective` of the one training loop: its batch is prompts (`prompt_rows`,
`prompt_collate`; the `labels` of a prompt batch are the indices of its data rows, which the
reward functions read), and the sampling happens inside the loss call, so a gradient stepper is
required (`ObjectiveConfig.check_stepper`). `generate_texts` also serves greedy evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petkit.core.model import disabled
from petkit.data import collate
from petkit.training.grpo_rewards import Scorer, total_reward
from petkit.training.objectives import Batch, ObjectiveOutput
from petkit.training.objectives_config import ObjectiveConfig
from petkit.training.objectives_preference import IGNORE, token_logps

Row = dict[str, Any]


def prompt_rows(encoded: Sequence[dict[str, list[int]]]) -> list[dict[str, Any]]:
    """Instruction-encoded rows (labels -100 on the prompt) -> prompt-only rows whose `labels`
    is the row's index (what `prompt_collate` batches and the rewards look up)."""
    out = []
    for i, row in enumerate(encoded):
        n_prompt = sum(1 for y in row["labels"] if y == IGNORE)
        out.append({"input_ids": list(row["input_ids"][:n_prompt]), "labels": i})
    return out


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int,
                 max_new_tokens: int, *, sample: bool = False, temperature: float = 1.0,
                 per_prompt: int = 1) -> list[list[int]]:
    """New tokens of `per_prompt` continuations of each prompt (grouped by prompt), each cut
    after its first EOS; greedy unless `sample`. The model is in eval mode meanwhile."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the same column
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(list(p)), 1
    device, was_training = _device(model), model.training
    model.eval()
    try:
        extra = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample \
            else {"do_sample": False}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, num_return_sequences=per_prompt,
                             pad_token_id=pad_id, eos_token_id=eos_id, **extra)
    finally:
        model.train(was_training)
    new = out[:, width:].tolist()
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in new]


def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` (token ids) as text, `batch_size` prompts at a time."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = generate_ids(model, prompts[start:start + batch_size], int(tokenizer.pad_token_id),
                           int(tokenizer.eos_token_id), max_new_tokens)
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards of N / G groups -> each reward's distance to its group mean over the group's
    standard deviation (+1e-4: a group of equal rewards gives advantages 0)."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + 1e-4)).reshape(-1)


def grpo_token_loss(logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, kl: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRPO loss (module docstring) of (N, T) token log-probabilities under the policy and
    the reference, (N,) advantages and the (N, T) completion mask; and the mean k3 KL."""
    ratio = torch.exp(logp - logp.detach())
    log_ref_ratio = ref_logp - logp
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -ratio * advantages.unsqueeze(1) + kl * k3
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    return loss, ((k3 * mask).sum(dim=1) / tokens).mean().detach()


class GRPOObjective:
    """Sample, score, and return the GRPO loss of a prompt batch; `log_fields` for the log."""

    def __init__(self, config: ObjectiveConfig, tokenizer: Any, rows: Sequence[Row],
                 scorers: Sequence[Scorer]) -> None:
        """`rows[i]` is the data row of prompt-batch label i (its prompt text, reference...)."""
        self.config, self.tokenizer, self.rows, self.scorers = config, tokenizer, rows, scorers
        self.pad_id, self.eos_id = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
        self._sums: dict[str, float] = {}
        self._calls = 0

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """One GRPO loss: G samples per prompt, rewards, advantages, policy and reference."""
        cfg, g = self.config, self.config.group_size
        mask = batch.get("attention_mask")  # the loop drops an all-ones mask
        lengths = mask.sum(dim=1).tolist() if mask is not None \
            else [batch["input_ids"].shape[1]] * len(batch["input_ids"])
        prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], lengths)]
        row_ids = [int(i) for i in batch["labels"].tolist() for _ in range(g)]
        completions = generate_ids(model, prompts, self.pad_id, self.eos_id, cfg.max_new_tokens,
                                   sample=True, temperature=cfg.temperature, per_prompt=g)
        rewards = self.rewards(row_ids, completions)
        advantages = group_advantages(rewards, g).to(_device(model))
        seqs = [{"input_ids": prompts[i // g] + c, "labels": [IGNORE] * len(prompts[i // g]) + c}
                for i, c in enumerate(completions)]
        full = {k: v.to(_device(model)) for k, v in collate(seqs, self.pad_id).items()}
        logp, mask = self._token_logps(model, full)
        with torch.no_grad(), disabled(model):
            ref_logp, _ = self._token_logps(model, full)
        loss, kl = grpo_token_loss(logp, ref_logp, advantages, mask.float(), cfg.kl)
        if model.training:
            self._record(rewards, kl, mask)
        return ObjectiveOutput(loss, None, None)

    def rewards(self, row_ids: list[int], completions: list[list[int]]) -> torch.Tensor:
        """(N,) weighted reward of each completion of the data rows `row_ids`."""
        rows = [self.rows[i] for i in row_ids]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts = [str(r.get("prompt", "")) for r in rows]
        return total_reward(self.scorers, prompts, texts, rows, row_ids)

    @staticmethod
    def _token_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False)
        return token_logps(out.logits, batch["labels"])

    def _record(self, rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor) -> None:
        groups = rewards.view(-1, self.config.group_size)
        row = {"reward_mean": float(rewards.mean()), "reward_std": float(groups.std(dim=1).mean()),
               "kl": float(kl), "completion_tokens": float(mask.sum(dim=1).float().mean())}
        self._calls += 1
        for key, value in row.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def log_fields(self) -> dict[str, float]:
        """Means since the last call: reward mean, within-group reward std, k3 KL, completion
        length in tokens."""
        out = {k: v / self._calls for k, v in self._sums.items()} if self._calls else {}
        self._sums, self._calls = {}, 0
        return out


def prompt_collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompts; `labels` (B,) their data rows' indices."""
    return collate(batch, pad_id)
