"""IST — importance-aware sparse tuning (Yao et al., 2024, "Layer-wise Importance Matters: Less
Memory for Better Performance in Parameter-efficient Fine-tuning of Large Language Models",
EMNLP 2024, arXiv:2410.11772). A training regime for any method whose delta sits in the blocks.

The trainable delta parameters are grouped by the block their wrapper's canonical path lies in
(`core.blocks`); parameters outside the blocks (a new head, a soft prompt) always train. Each
block i has an importance score s_i (0 at the start). Every step, k blocks are drawn without
replacement with probability proportional to sigmoid(s) and only their deltas receive gradients
(`requires_grad` is switched off for the others, so backprop neither computes nor stores their
gradients). Every `every` steps the scores are re-estimated by response suppression, as in the
authors' code: `ROUNDS` times, half of the blocks are drawn with probability proportional to
sigmoid(-s), their deltas are switched off, and the loss L_r of the step's first micro-batch is
measured (eval mode, no gradients). With rewards R_r = exp(-L_r) - mean_r exp(-L_r),

    s_i <- s_i - LR * sum_r [i suppressed in round r] R_r * sigmoid(s_i) (1 - sigmoid(s_i))

so a block whose removal hurts (low reward) gains importance. (The reference implementation scales
LoRA outputs by 0.25 to suppress them; petkit switches any method's deltas off.) It wraps the
backprop stepper; the chosen blocks are logged as `ist_layers` and counted in the run's report.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petkit.core.delta import DeltaModule, iter_deltas
from petkit.core.errors import ConfigError
from petkit.core.blocks import layer_of, layer_paths

from petkit.training.steppers.backprop import BackpropStepper
from petkit.training.steppers.base import Batch, LossFn, Stepper

if TYPE_CHECKING:  # annotations only: the run's config holds an IstConfig
    from petkit.training.config import TrainConfig

ROUNDS = 3  # suppression rounds per re-scoring
LR = 10.0  # step size of the score update
SUPPRESSED = 0.5  # fraction of the blocks switched off in a round


@dataclass(frozen=True)
class IstConfig:
    """IST's settings (`TrainConfig.ist`): update `top_k` sampled blocks per step, re-score
    their importance every `every` steps. Flat keys of earlier releases: ist_top_k, ist_every."""

    top_k: int
    every: int = 10

    def __post_init__(self) -> None:
        """top_k >= 1 (at most the model's number of blocks, checked at train time); every >= 1."""
        for name, value in (("top_k", self.top_k), ("every", self.every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainConfig.ist.{name} (train.ist_{name}) must be an int "
                                  f">= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IstConfig:
        """Build from a mapping; unknown or missing keys raise `ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "top_k" not in data:
            raise ConfigError(f"TrainConfig.ist needs top_k (and optionally every); got "
                              f"{sorted(data)}")
        return cls(**data)


class LayerGroups:
    """Trainable delta parameters and wrappers of a model, by block index."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        stack = layer_paths(model)
        self.num_layers = len(stack)
        wanted = {id(p) for p in params.values()}
        self.params: dict[int, list[nn.Parameter]] = {}
        self.wrappers: dict[int, list[DeltaModule]] = {}
        for path, wrapper in iter_deltas(model):
            own = [p for p in wrapper.delta_parameters().values() if id(p) in wanted]
            layer = layer_of(path, stack)
            if own and layer is not None:
                self.params.setdefault(layer, []).extend(own)
                self.wrappers.setdefault(layer, []).append(wrapper)
        self.layers = sorted(self.params)


def check_ist(config: TrainConfig, groups: LayerGroups, stepper: Stepper) -> None:
    """ConfigError unless IST can run: a block stack, deltas in it, k <= blocks, backprop."""
    assert config.ist is not None
    k = config.ist.top_k
    if groups.num_layers == 0:
        raise ConfigError("TrainConfig.ist_top_k needs a model with a stack of transformer blocks")
    if k > groups.num_layers:
        raise ConfigError(f"TrainConfig.ist_top_k must be in [1, {groups.num_layers}] (the model's "
                          f"number of layers), got {k}")
    if not groups.layers:
        raise ConfigError("TrainConfig.ist_top_k needs a method whose delta sits inside the blocks "
                          "(this adapter's trainable parameters are all outside them)")
    if not isinstance(stepper, BackpropStepper):
        raise ConfigError(f"TrainConfig.ist_top_k works with the backprop stepper, not "
                          f"{type(stepper).__name__}")


class ISTStepper:
    """A stepper that lets only k importance-sampled blocks' deltas train at each step."""

    def __init__(self, inner: Stepper, model: nn.Module, params: dict[str, nn.Parameter],
                 config: TrainConfig) -> None:
        self.inner, self.model = inner, model
        self.groups = LayerGroups(model, params)
        check_ist(config, self.groups, inner)
        self.params = list(params.values())
        assert config.ist is not None
        self.k = min(config.ist.top_k, len(self.groups.layers))
        self.every = config.ist.every
        self.scores = torch.zeros(len(self.groups.layers))
        self.counts = [0] * len(self.groups.layers)
        self.generator = torch.Generator().manual_seed(config.seed + 7919)
        self.steps = 0
        self.chosen: list[int] = []

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> float:
        """Re-score every `every` steps, draw k blocks, update only their deltas."""
        if self.steps > 0 and self.steps % self.every == 0:
            self.rescore(micro_batches[0], loss_fn)
        picks = self._draw(torch.sigmoid(self.scores), self.k)
        self.chosen = [self.groups.layers[i] for i in picks]
        for i in picks:
            self.counts[i] += 1
        frozen = [p for i, layer in enumerate(self.groups.layers) if i not in picks
                  for p in self.groups.params[layer]]
        for p in frozen:
            p.requires_grad_(False)
        try:
            loss = self.inner.step(micro_batches, loss_fn)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.steps += 1
        return loss

    def _draw(self, weights: torch.Tensor, count: int) -> list[int]:
        return sorted(torch.multinomial(weights, count, replacement=False, generator=self.generator).tolist())

    @torch.no_grad()
    def rescore(self, batch: Batch, loss_fn: LossFn) -> None:
        """Response suppression: switch off half of the blocks' deltas, reward low losses."""
        n = len(self.groups.layers)
        size = max(1, int(n * SUPPRESSED))
        rounds = [self._draw(torch.sigmoid(-self.scores), size) for _ in range(ROUNDS)]
        was_training = self.model.training
        self.model.eval()
        try:
            rewards = [math.exp(-self._suppressed_loss(batch, loss_fn, r)) for r in rounds]
        finally:
            self.model.train(was_training)
        mean = sum(rewards) / len(rewards)
        slope = torch.sigmoid(self.scores) * (1 - torch.sigmoid(self.scores))
        for picked, reward in zip(rounds, rewards):
            for i in picked:
                self.scores[i] -= LR * (reward - mean) * slope[i]

    def _suppressed_loss(self, batch: Batch, loss_fn: LossFn, picked: list[int]) -> float:
        wrappers = [w for i in picked for w in self.groups.wrappers[self.groups.layers[i]]]
        states = [w.active for w in wrappers]
        for w in wrappers:
            w.set_state(active=False)
        try:
            return float(loss_fn(batch))
        finally:
            for w, active in zip(wrappers, states):
                w.set_state(active=active)

    def current_lr(self) -> float:
        return self.inner.current_lr()

    def log_fields(self) -> dict[str, Any]:
        """For the train log row: the blocks of the last step and the current scores."""
        return {"ist_layers": list(self.chosen), "ist_scores": [round(float(s), 4) for s in self.scores]}

    def report(self) -> dict[str, Any]:
        """For the run's summary: how many steps each block was updated in."""
        return {"ist_layer_steps": {str(layer): c for layer, c in zip(self.groups.layers, self.counts)}}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "scores": self.scores.clone(),
                "counts": list(self.counts), "steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.scores = state["scores"].clone()
        self.counts = list(state["counts"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])


def with_ist(stepper: Stepper, model: nn.Module, params: dict[str, nn.Parameter],
             config: TrainConfig) -> Stepper:
    """`stepper` wrapped in IST when `config.ist` is set, else unchanged."""
    if config.ist is None:
        return stepper
    return ISTStepper(stepper, model, params, config)
