"""Preference tuning for any method as a library call: `train_preference` (DPO, RPO, or any
objective of `training/objectives_preference.py`) and MEET's two steps (`meet`).

The objectives live in training/ and plug into the one training loop (`pk.train(...,
objective=)`); the reference is the model inside `pk.disabled(model)`, so no second copy of the
weights is held. DPO (Rafailov et al., 2023):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

With `rpo_alpha > 0` the loss gains the chosen answers' negative log-likelihood per token (RPO,
Pang et al., 2024; TRL's `rpo_alpha`), which keeps DPO from lowering the chosen answers' own
likelihood along with the rejected ones' ("likelihood displacement").

`DPOModel` wraps a model so that its forward on a pair batch (`pair_collate`) is the loss (kept
for callers that drive the forward themselves). MEET (control tokens by prompt tuning with the
preference objective, then a LoRA with them fixed) is `meet`, and from the command line the
recipe `petkit train --recipe meet` runs the same two steps (docs/objectives.md).
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
from petkit.core.model import activate, attach, set_trainable, trainable_parameters
from petkit.core.state import active_adapters, adapters
from petkit.training import TrainConfig, TrainResult, train
from petkit.training.objectives_config import ObjectiveConfig
from petkit.training.objectives_preference import (IGNORE, REJECTED, PreferenceObjective,
                                                   chosen_only, encode_pairs, pair_collate,
                                                   sequence_logp)

__all__ = ["DPOModel", "IGNORE", "REJECTED", "PreferenceOutput", "chosen_only", "dpo_loss",
           "encode_pairs", "meet", "pair_collate", "sequence_logp", "train_preference"]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Mean DPO loss over the pairs (module docstring)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def _objective(beta: float, rpo_alpha: float) -> ObjectiveConfig:
    """DPO, or RPO when `rpo_alpha > 0` (errors name the library arguments)."""
    if not beta > 0:
        raise ConfigError(f"DPO beta must be > 0, got {beta!r}")
    if not rpo_alpha >= 0:
        raise ConfigError(f"rpo_alpha must be >= 0 (0: plain DPO), got {rpo_alpha!r}")
    return ObjectiveConfig(name="rpo" if rpo_alpha else "dpo", beta=float(beta),
                           rpo_alpha=float(rpo_alpha))


@dataclass
class PreferenceOutput:
    """What `DPOModel.forward` returns: the loss and the per-pair margins as `logits`."""

    loss: torch.Tensor
    logits: torch.Tensor


class DPOModel(nn.Module):
    """`model` (adapters attached) whose forward on a pair batch is the DPO (or RPO) loss."""

    def __init__(self, model: nn.Module, beta: float = 0.1, rpo_alpha: float = 0.0) -> None:
        super().__init__()
        self.objective = PreferenceObjective(_objective(beta, rpo_alpha))
        self.model, self.beta, self.rpo_alpha = model, float(beta), float(rpo_alpha)
        self.config = getattr(model, "config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> PreferenceOutput:
        """The loss of a `pair_collate` batch: rows [:B] chosen, [B:] rejected."""
        if labels is None or len(input_ids) % 2:
            raise ConfigError("DPOModel needs a pair batch (pair_collate): chosen rows, then "
                              "rejected rows, with labels")
        batch = {"input_ids": input_ids, "labels": labels}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        s = self.objective.logps(self.model, batch)
        loss, _ = self.objective.loss(s, self.objective.config)
        return PreferenceOutput(loss, s.h().detach())


def train_preference(model: nn.Module, pairs: Sequence[dict], config: TrainConfig | None = None,
                     *, beta: float = 0.1, pad_id: int = 0,
                     eval_pairs: Sequence[dict] | None = None,
                     rpo_alpha: float = 0.0) -> TrainResult:
    """Preference-train the active, trainable adapters of `model` on encoded `pairs`
    (`encode_pairs`) with `pk.train` (any stepper): DPO, RPO with `rpo_alpha > 0`, or the
    objective `config.objective` names (then `beta` / `rpo_alpha` come from it). With
    `config.output_dir`, the adapter is saved to `output_dir/adapter`; checkpoints and resume
    are not offered here. `report["dpo_trace"]` holds one `trace_row` per training step."""
    config = config or TrainConfig()
    if config.resume or config.save_every:
        raise ConfigError("TrainConfig.resume / save_every are not offered for DPO runs "
                          "(train_preference saves the adapter at the end)")
    if not trainable_parameters(model):
        raise ConfigError("the model has no trainable parameters: attach a method first")
    spec = config.objective if config.objective is not None and config.objective.is_preference \
        else _objective(beta, rpo_alpha)
    objective = PreferenceObjective(spec)
    out = config.output_dir
    result = train(model, list(pairs), config.replace(output_dir=None, objective=spec),
                   eval_pairs, collate_fn=lambda b: pair_collate(b, pad_id), pad_id=pad_id,
                   objective=objective)
    result.report["dpo_trace"] = objective.trace
    if out is not None:
        trained = [n for n in active_adapters(model) if adapters(model)[n].trainable]
        result.adapter_path = str(save_adapter(model, f"{out}/adapter", name=trained[0]))
    return result


def meet(model: nn.Module, pairs: Sequence[dict], control: Any, lora: Any,
         config: TrainConfig, *, control_config: TrainConfig | None = None, beta: float = 0.1,
         pad_id: int = 0, seed: int | None = None,
         rpo_alpha: float = 0.0) -> tuple[TrainResult, TrainResult]:
    """MEET's two steps: (1) learn control tokens (`control`, a prompt-tuning config) by prompt
    tuning with the preference objective; (2) attach `lora` and train it with the same objective
    while the control tokens stay fixed. Both adapters stay active ("control", "meet"). With
    `seed`, both are attached with it (`attach(seed=)`); `rpo_alpha` applies to both steps."""
    attach(model, control, "control", seed=seed)
    first = train_preference(model, pairs, control_config or config, beta=beta, pad_id=pad_id,
                             rpo_alpha=rpo_alpha)
    set_trainable(model, "control", False)
    attach(model, lora, "meet", seed=seed)
    activate(model, ["control", "meet"])
    second = train_preference(model, pairs, config, beta=beta, pad_id=pad_id,
                              rpo_alpha=rpo_alpha)
    return first, second
