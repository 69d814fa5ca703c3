"""Backpropagation stepper: AdamW or SGD, gradient accumulation, clipping, LR schedule.

One step = `len(micro_batches)` forward/backward passes whose gradients are averaged, an optional
clip of the global grad norm to `max_grad_norm`, one optimiser update, one scheduler tick.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petkit.training.config import TrainConfig
from petkit.training.stepper_config import StepperConfig, is_num
from petkit.training.schedule import lr_factor
from petkit.training.steppers import Batch, LossFn, register_stepper


@dataclass(frozen=True)
class BackpropConfig(StepperConfig):
    """Backprop's own settings: SGD momentum, AdamW betas, and the fused AdamW kernel (None:
    fused when every parameter is on a GPU)."""

    NAME: ClassVar[str] = "backprop"
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adamw", "sgd")

    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    fused: bool | None = None

    def __post_init__(self) -> None:
        """Momentum and betas in [0, 1); fused None, true or false."""
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            self.require(is_num(value) and 0 <= value < 1, name, "a number in [0, 1)", value)
        self.require(self.fused is None or isinstance(self.fused, bool), "fused",
                     "None, true or false", self.fused)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    own = config.stepper
    assert isinstance(own, BackpropConfig)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=own.momentum,
                               weight_decay=config.weight_decay)
    fused = own.fused
    if fused is None:
        fused = bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point
                                     for p in params)
    return torch.optim.AdamW(params, lr=config.lr, betas=(own.beta1, own.beta2),
                             weight_decay=config.weight_decay, fused=fused or None)


class BackpropStepper:
    """Gradient descent on the trainable parameters with a torch optimiser."""

    def __init__(self, params: dict[str, nn.Parameter], config: TrainConfig,
                 total_steps: int) -> None:
        """Optimiser over `params` (in dict order); schedule over `total_steps`."""
        self.params = list(params.values())
        self.max_grad_norm = config.max_grad_norm
        self.optimizer = _optimizer(self.params, config)
        factor = functools.partial(lr_factor, total_steps=total_steps,
                                   warmup_steps=config.warmup(total_steps),
                                   schedule=config.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> torch.Tensor:
        """Average the micro-batches' gradients, clip, update, tick the schedule. The mean loss
        stays on the device (the loop reads it back when it logs): nothing in a step waits for
        the device, so the host prepares the next batch while this step runs."""
        losses = []
        for batch in micro_batches:
            loss = loss_fn(batch)
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).double().sum() / len(micro_batches)

    def current_lr(self) -> float:
        """Learning rate of the next update."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Optimiser and scheduler state (tensors and plain values only)."""
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": sched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore optimiser and scheduler state."""
        self.optimizer.load_state_dict(state["optimizer"])
        sched = dict(state["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups))
        self.scheduler.load_state_dict(sched)


@register_stepper("backprop", config=BackpropConfig)
def _make_backprop(params: dict[str, nn.Parameter], config: TrainConfig,
                   total_steps: int) -> BackpropStepper:
    return BackpropStepper(params, config, total_steps)
