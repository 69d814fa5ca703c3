"""How the run's sections fit together: which stepper serves `TrainConfig.optimizer`, how
`TrainConfig.stepper` ("auto", a name, a dict or a config object) becomes that stepper's config,
and the checks that involve more than one section (`check_sections`).

The stepper configs live beside the steppers (`steppers/`), IST's too (`steppers/ist.py`);
importing this module registers every built-in stepper, and no stepper imports it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import petkit.training.steppers  # noqa: F401  (registers the built-in steppers)
from petkit.core.errors import ConfigError
from petkit.training.steppers.base import StepperConfig, registered_configs

if TYPE_CHECKING:  # annotations only: the config calls these checks
    from petkit.training.config import TrainConfig


def stepper_configs() -> dict[str, type[StepperConfig]]:
    """Registered stepper configs by name (importing this module registered the built-in ones)."""
    return registered_configs()


def optimizers(gradient_free: bool = False) -> list[str]:
    """Every `TrainConfig.optimizer` value some registered stepper serves (only those of
    gradient-free steppers when `gradient_free`)."""
    return sorted({o for cls in stepper_configs().values() if cls.GRADIENT_FREE or not gradient_free
                   for o in cls.OPTIMIZERS})


def stepper_for(optimizer: str) -> type[StepperConfig]:
    """The stepper config class that serves `optimizer` ("auto")."""
    for cls in stepper_configs().values():
        if optimizer in cls.OPTIMIZERS:
            return cls
    raise ConfigError(f"TrainConfig.optimizer must be one of {optimizers()}, got {optimizer!r}")


def resolve_stepper(optimizer: str, stepper: Any) -> StepperConfig:
    """`stepper` ("auto", a name, a dict or a config) as a config object that serves `optimizer`."""
    auto = stepper_for(optimizer)
    if isinstance(stepper, StepperConfig):
        if stepper.OPTIMIZERS and optimizer not in stepper.OPTIMIZERS:
            if stepper == type(stepper)():  # defaults carry no choice: follow the optimizer
                return auto()
            raise ConfigError(f"TrainConfig.stepper must be 'auto' or {auto.NAME!r} for "
                              f"optimizer={optimizer!r}, got {stepper.NAME!r} with options "
                              f"{stepper.to_dict()}")
        return stepper
    if isinstance(stepper, dict):
        name = stepper.get("name", "auto")
        cls = auto if name == "auto" else _named(name)
        return resolve_stepper(optimizer, cls.from_dict(stepper))
    if stepper == "auto":
        return auto()
    cls = _named(stepper)
    if cls.OPTIMIZERS and optimizer not in cls.OPTIMIZERS:
        raise ConfigError(f"TrainConfig.stepper must be 'auto' or {auto.NAME!r} for "
                          f"optimizer={optimizer!r}, got {stepper!r}")
    return cls()


def _named(name: Any) -> type[StepperConfig]:
    configs = stepper_configs()
    if not isinstance(name, str) or name not in configs:
        raise ConfigError(f"TrainConfig.stepper must be 'auto' or one of {sorted(configs)}, "
                          f"got {name!r}")
    return configs[name]


def check_sections(train: TrainConfig) -> None:
    """The checks that involve the stepper and the rest of the run: a head learning rate needs a
    stepper with parameter groups; the objective must suit the stepper; the stepper's own
    `check` (e.g. a zeroth-order log needs `output_dir`)."""
    stepper = train.stepper
    assert isinstance(stepper, StepperConfig)
    if train.head_lr is not None and not stepper.HEAD_LR:
        raise ConfigError(f"TrainConfig.head_lr must be None for optimizer={train.optimizer!r} "
                          f"(stepper {stepper.NAME!r} has no per-parameter learning rates; "
                          f"head_lr needs adamw or sgd), got {train.head_lr!r}")
    if train.objective is not None:
        train.objective.check_stepper(stepper.NAME)
    if train.runtime.offload_optimizer != "none" and stepper.NAME != "backprop":
        raise ConfigError(f"--runtime.offload_optimizer={train.runtime.offload_optimizer} applies to "
                          "backprop runs (--optimizer adamw or sgd), not to the "
                          f"{stepper.NAME!r} stepper of --optimizer {train.optimizer} (no backward "
                          "pass whose gradients could stream to the host)")
    stepper.check(train)
