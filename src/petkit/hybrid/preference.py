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

import warnings
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


def _loose(beta: float | None, rpo_alpha: float | None, where: str) -> tuple[float, float]:
    """beta / rpo_alpha given as keywords (earlier releases): kept, with a DeprecationWarning
    naming the train section's objective; defaults DPO beta 0.1, no RPO term."""
    given = [k for k, v in (("beta", beta), ("rpo_alpha", rpo_alpha)) if v is not None]
    if given:
        warnings.warn(f"{where}({', '.join(given)}=...) is deprecated: give the objective in the "
                      "train section, TrainConfig(objective=ObjectiveConfig(name='dpo' | 'rpo', "
                      "beta=..., rpo_alpha=...)) (a recipe's train.objective)",
                      DeprecationWarning, stacklevel=3)
    return 0.1 if beta is None else beta, 0.0 if rpo_alpha is None else rpo_alpha


def train_preference(model: nn.Module, pairs: Sequence[dict], config: TrainConfig | None = None,
                     *, beta: float | None = None, pad_id: int = 0,
                     eval_pairs: Sequence[dict] | None = None,
                     rpo_alpha: float | None = None) -> TrainResult:
    """Preference-train the active, trainable adapters of `model` on encoded `pairs`
    (`encode_pairs`) with `pk.train` (any stepper) and the preference objective of the train
    section `config` (`config.objective`: dpo, rpo, ipo, ...; none: DPO with beta 0.1). The
    keywords `beta` and `rpo_alpha` (RPO when > 0) are those of earlier releases (deprecated).
    With `config.output_dir`, the adapter is saved to `output_dir/adapter`; checkpoints and
    resume are not offered here. `report["dpo_trace"]` holds one `trace_row` per training step."""
    beta, rpo_alpha = _loose(beta, rpo_alpha, "train_preference")
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
         config: TrainConfig, *, control_config: TrainConfig | None = None,
         beta: float | None = None, pad_id: int = 0, seed: int | None = None,
         rpo_alpha: float | None = None) -> tuple[TrainResult, TrainResult]:
    """MEET's two steps: (1) learn control tokens (`control`, a prompt-tuning config) by prompt
    tuning with the preference objective of `control_config` (default `config`); (2) attach
    `lora` and train it with `config`'s while the control tokens stay fixed. Both adapters stay
    active ("control", "meet"). With `seed`, both are attached with it (`attach(seed=)`).
    `beta` / `rpo_alpha`: as in `train_preference` (deprecated keywords; both steps)."""
    given = {k: v for k, v in (("beta", beta), ("rpo_alpha", rpo_alpha)) if v is not None}
    if given:
        _loose(beta, rpo_alpha, "meet")  # the warning; the values go on to both steps
    attach(model, control, "control", seed=seed)
    with warnings.catch_warnings():  # said once above
        warnings.simplefilter("ignore", DeprecationWarning)
        first = train_preference(model, pairs, control_config or config, pad_id=pad_id, **given)
    set_trainable(model, "control", False)
    attach(model, lora, "meet", seed=seed)
    activate(model, ["control", "meet"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        second = train_preference(model, pairs, config, pad_id=pad_id, **given)
    return first, second
