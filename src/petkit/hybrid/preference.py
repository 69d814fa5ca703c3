"""Preference tuning for any method: DPO with the reference served by `pk.disabled(model)`.

DPO (Rafailov et al., 2023) on pairs (prompt x, chosen y_w, rejected y_l):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where pi is the model with its active adapters and ref the same model with every adapter off
(`pk.disabled`), so no second copy of the weights is held: the reference costs a second forward
pass under `torch.no_grad`, not memory. Log-probabilities sum over the answer tokens (labels
other than -100). Any method works, additive-input ones (prompt, prefix) included, because
`pk.disabled` gives the exact base.

With `rpo_alpha > 0` the loss gains the chosen answers' negative log-likelihood per token (RPO,
Pang et al., 2024, "Iterative Reasoning Preference Optimization"; TRL's `rpo_alpha`):

    loss_RPO = loss + rpo_alpha * (-sum log pi(y_w|x) / |y_w|)   (tokens of the batch's chosen rows)

It keeps DPO from lowering the chosen answers' own likelihood along with the rejected ones'
("likelihood displacement"), which can move the model's mass onto text neither side holds.

`DPOModel` wraps the model so the one training loop (`pk.train`, any stepper) trains it:
its forward takes the collated pair batch (chosen rows first, then rejected; `pair_collate`)
and returns the DPO loss. `train_preference` is the entry point; `meet` runs MEET's two steps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petkit.core.errors import ConfigError
from petkit.core.io import save_adapter
from petkit.core.model import activate, attach, disabled, set_trainable, trainable_parameters
from petkit.core.state import active_adapters, adapters
from petkit.data import collate
from petkit.training import TrainConfig, TrainResult, train

IGNORE = -100
REJECTED = "rejected_"


def sequence_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) sum of log p(label_t | < t) over positions whose label is not -100 (shifted)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Mean DPO loss over the pairs (module docstring)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


@dataclass
class PreferenceOutput:
    """What `DPOModel.forward` returns: the loss and the per-pair reward margins as `logits`."""

    loss: torch.Tensor
    logits: torch.Tensor


class DPOModel(nn.Module):
    """`model` (adapters attached) whose forward on a pair batch is the DPO loss."""

    def __init__(self, model: nn.Module, beta: float = 0.1, rpo_alpha: float = 0.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ConfigError(f"DPO beta must be > 0, got {beta!r}")
        if not rpo_alpha >= 0:
            raise ConfigError(f"rpo_alpha must be >= 0 (0: plain DPO), got {rpo_alpha!r}")
        self.model, self.beta, self.rpo_alpha = model, float(beta), float(rpo_alpha)
        self.config = getattr(model, "config", None)
        self.trace: list[dict[str, float]] = []  # one row per training forward (`trace_row`)

    def logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              labels: torch.Tensor) -> torch.Tensor:
        """Answer log-probabilities of every row under the model as it is now."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return sequence_logp(out.logits, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> PreferenceOutput:
        """DPO loss of a `pair_collate` batch: rows [:B] chosen, [B:] rejected."""
        if labels is None or len(input_ids) % 2:
            raise ConfigError("DPOModel needs a pair batch (pair_collate): chosen rows, then "
                              "rejected rows, with labels")
        policy = self.logps(input_ids, attention_mask, labels)
        with torch.no_grad(), disabled(self.model):
            ref = self.logps(input_ids, attention_mask, labels)
        half = len(input_ids) // 2
        loss = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.beta)
        if self.rpo_alpha:
            tokens = (labels[:half, 1:] != IGNORE).sum().clamp(min=1)
            loss = loss - self.rpo_alpha * policy[:half].sum() / tokens
        margins = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])
        if self.training and torch.is_grad_enabled():
            self.trace.append(trace_row(loss, policy.detach(), ref, labels, half))
        return PreferenceOutput(loss, margins.detach())


def trace_row(loss: torch.Tensor, policy: torch.Tensor, ref: torch.Tensor,
              labels: torch.Tensor, half: int) -> dict[str, float]:
    """What one DPO step did, averaged over its pairs: the loss, the chosen and rejected
    log-ratios log pi - log ref (summed over answer tokens), the share of pairs whose margin is
    positive, and the policy's mean log-probability per chosen answer token (falling far below
    the reference's means the chosen text itself is being unlearned)."""
    ratio = policy - ref
    tokens = (labels[:half, 1:] != IGNORE).sum().clamp(min=1)
    margin = ratio[:half] - ratio[half:]
    return {"loss": float(loss.detach()), "chosen": float(ratio[:half].mean()),
            "rejected": float(ratio[half:].mean()), "accuracy": float((margin > 0).float().mean()),
            "chosen_token_logp": float(policy[:half].sum() / tokens),
            "ref_chosen_token_logp": float(ref[:half].sum() / tokens)}


def encode_pairs(pairs: Sequence[dict[str, str]], tokenizer: Any,
                 max_length: int = 96) -> list[dict[str, list[int]]]:
    """Each {"prompt", "chosen", "rejected"} -> chosen and rejected token rows with -100 on the
    prompt (`REJECTED`-prefixed keys for the rejected side); answers end with EOS."""
    out = []
    for i, pair in enumerate(pairs):
        missing = [k for k in ("prompt", "chosen", "rejected") if not pair.get(k)]
        if missing:
            raise ConfigError(f"preference pair {i} lacks {missing}")
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        row: dict[str, list[int]] = {}
        for side, prefix in (("chosen", ""), ("rejected", REJECTED)):
            answer = tokenizer(pair[side], add_special_tokens=False)["input_ids"]
            answer = (answer + [tokenizer.eos_token_id])[: max(1, max_length - len(prompt))]
            ids = (prompt + answer)[:max_length]
            row[prefix + "input_ids"] = ids
            row[prefix + "labels"] = ([IGNORE] * len(prompt) + answer)[:max_length]
        out.append(row)
    return out


def chosen_only(pairs: Sequence[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The chosen side of encoded pairs as ordinary instruction examples (supervised baseline)."""
    return [{"input_ids": p["input_ids"], "attention_mask": [1] * len(p["input_ids"]),
             "labels": p["labels"]} for p in pairs]


def pair_collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one width (labels -100 on padding)."""
    rows = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch]
    rows += [{"input_ids": b[REJECTED + "input_ids"], "labels": b[REJECTED + "labels"]}
             for b in batch]
    return collate(rows, pad_id)


def train_preference(model: nn.Module, pairs: Sequence[dict], config: TrainConfig | None = None,
                     *, beta: float = 0.1, pad_id: int = 0,
                     eval_pairs: Sequence[dict] | None = None,
                     rpo_alpha: float = 0.0) -> TrainResult:
    """DPO-train the active, trainable adapters of `model` on encoded `pairs` (`encode_pairs`)
    with `pk.train` (any stepper). With `config.output_dir`, the adapter is saved to
    `output_dir/adapter`; checkpoints and resume are not offered for DPO runs. The result's
    `report["dpo_trace"]` holds one `trace_row` per training forward (loss, chosen / rejected
    log-ratios, pair accuracy). `rpo_alpha > 0` adds RPO's chosen-side NLL term (module
    docstring)."""
    config = config or TrainConfig()
    if config.resume or config.save_every:
        raise ConfigError("TrainConfig.resume / save_every are not offered for DPO runs "
                          "(train_preference saves the adapter at the end)")
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("the model has no trainable parameters: attach a method first")
    out = config.output_dir
    wrapper = DPOModel(model, beta, rpo_alpha)
    result = train(wrapper, list(pairs), config.replace(output_dir=None), eval_pairs,
                   collate_fn=lambda b: pair_collate(b, pad_id), pad_id=pad_id, parameters=params)
    result.report["dpo_trace"] = wrapper.trace
    if out is not None:
        trained = [n for n in active_adapters(model) if adapters(model)[n].trainable]
        result.adapter_path = str(save_adapter(model, f"{out}/adapter", name=trained[0]))
    return result


def meet(model: nn.Module, pairs: Sequence[dict], control: Any, lora: Any,
         config: TrainConfig, *, control_config: TrainConfig | None = None, beta: float = 0.1,
         pad_id: int = 0, seed: int | None = None,
         rpo_alpha: float = 0.0) -> tuple[TrainResult, TrainResult]:
    """MEET's two steps: (1) learn control tokens (`control`, a prompt-tuning config) by prompt
    tuning with the DPO objective; (2) attach `lora` and train it with DPO while the control
    tokens stay fixed. Both adapters stay active ("control", "meet"). With `seed`, both are
    attached with it (`attach(seed=)`); `rpo_alpha` applies to both steps."""
    attach(model, control, "control", seed=seed)
    first = train_preference(model, pairs, control_config or config, beta=beta, pad_id=pad_id,
                             rpo_alpha=rpo_alpha)
    set_trainable(model, "control", False)
    attach(model, lora, "meet", seed=seed)
    activate(model, ["control", "meet"])
    second = train_preference(model, pairs, config, beta=beta, pad_id=pad_id,
                              rpo_alpha=rpo_alpha)
    return first, second
