"""Steppers: how one optimisation step updates the trainable parameters.

The training loop hands a stepper the step's micro-batches and a `loss_fn(batch) -> loss` closure
(forward pass, autocast and objective already inside). What the stepper does with them is its own
business: backprop calls `.backward()`; a zeroth-order stepper (MeZO) runs two forward passes under
seeded perturbations; an evolution stepper (CMA-ES) evaluates a population. A new stepper is one
file in this package that defines a class with the `Stepper` protocol (`base.py`), its own
settings as a `StepperConfig` dataclass (which `TrainConfig.stepper` then holds), and registers
both with `@register_stepper(name, config=MyConfig)`. Optional hooks (`bind_model`, `log_fields`,
...) are the Protocols in `base.py`; the loop checks them with isinstance.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from torch import nn

from petkit.core.errors import ConfigError
from petkit.training.steppers.base import (Batch, LossFn, Stepper, StepperConfig, StepperFactory,
                                           register_stepper, registered_factories)

if TYPE_CHECKING:  # annotations only
    from petkit.training.config import TrainConfig

def list_steppers() -> list[str]:
    """Registered stepper names."""
    return sorted(registered_factories())


def make_stepper(params: dict[str, nn.Parameter], config: TrainConfig, total_steps: int) -> Stepper:
    """Build the stepper `config.stepper` names (or, when "auto", the optimizer's) for `params`."""
    name = config.stepper_name()
    factories = registered_factories()
    if name not in factories:
        raise ConfigError(f"TrainConfig.stepper must be 'auto' or one of {list_steppers()}, "
                          f"got {config.stepper!r}")
    return factories[name](params, config, total_steps)


def _register_all() -> None:
    """Import every module of this package: each stepper file registers itself on import, so a
    new stepper is one file here (backprop, zeroth, cma_es, ...)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()

__all__ = ["Batch", "LossFn", "Stepper", "StepperConfig", "StepperFactory", "list_steppers",
           "make_stepper", "register_stepper"]
