"""Steppers: how one optimisation step updates the trainable parameters.

The training loop hands a stepper the step's micro-batches and a `loss_fn(batch) -> loss` closure
(forward pass, autocast and objective already inside). What the stepper does with them is its own
business: backprop calls `.backward()`; a zeroth-order stepper (MeZO) runs two forward passes under
seeded perturbations; an evolution stepper (CMA-ES) evaluates a population. A new stepper is one
file that defines a class with this protocol, its own settings as a `StepperConfig` dataclass
(which `TrainConfig.stepper` then holds), and registers both with
`@register_stepper(name, config=MyConfig)`.
A stepper may also define `bind_model(model)`; the loop calls it once before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import importlib
import pkgutil
from typing import Any, Protocol

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.training.config import TrainConfig
from petkit.training.stepper_config import StepperConfig, register_stepper_config

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]


class Stepper(Protocol):
    """Updates a fixed set of parameters, one optimisation step at a time."""

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> float | torch.Tensor:
        """Do one update from `micro_batches`; return the step's mean training loss: a float, or
        a 0-dim tensor that the loop reads back only when it logs (no device sync per step)."""
        ...

    def current_lr(self) -> float:
        """Learning rate used by the next step (for logging)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State to resume from; only tensors, numbers, strings, lists, dicts (no pickle)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...


StepperFactory = Callable[[dict[str, nn.Parameter], TrainConfig, int], Stepper]
_REGISTRY: dict[str, StepperFactory] = {}


def register_stepper(name: str, config: type[StepperConfig] | None = None
                     ) -> Callable[[StepperFactory], StepperFactory]:
    """Decorator: make `factory(params, train_config, total_steps)` available as stepper `name`.

    `config` is the stepper's own settings class (`NAME` must equal `name`); a stepper without
    settings gets an empty one, so `TrainConfig(stepper=name)` works for it too.
    """
    if config is None:
        config = dataclasses.make_dataclass(f"{name}Config", [], bases=(StepperConfig,),
                                            frozen=True, namespace={"NAME": name})
    if config.NAME != name:
        raise ConfigError(f"stepper {name!r}: its config {config.__name__}.NAME is {config.NAME!r}")
    register_stepper_config(config)

    def decorate(factory: StepperFactory) -> StepperFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_steppers() -> list[str]:
    """Registered stepper names."""
    return sorted(_REGISTRY)


def make_stepper(params: dict[str, nn.Parameter], config: TrainConfig, total_steps: int) -> Stepper:
    """Build the stepper `config.stepper` names (or, when "auto", the optimizer's) for `params`."""
    name = config.stepper_name()
    if name not in _REGISTRY:
        raise ConfigError(f"TrainConfig.stepper must be 'auto' or one of {list_steppers()}, "
                          f"got {config.stepper!r}")
    return _REGISTRY[name](params, config, total_steps)


def _register_all() -> None:
    """Import every module of this package: each stepper file registers itself on import, so a
    new stepper is one file here (backprop, zeroth, cma_es, ...)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()

__all__ = ["Batch", "LossFn", "Stepper", "StepperConfig", "StepperFactory", "list_steppers",
           "make_stepper",
           "register_stepper"]
