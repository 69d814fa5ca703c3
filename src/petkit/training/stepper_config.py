"""Steppers' own settings: the `StepperConfig` base, its registry, and how `TrainConfig.stepper`
("auto", a name, a dict or a config object) becomes the config of the stepper serving the run's
optimizer. Each stepper defines and registers its config in its own file (`steppers/`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from petkit.core.errors import ConfigError

if TYPE_CHECKING:
    from petkit.training.config import TrainConfig

S = TypeVar("S", bound="StepperConfig")


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class StepperConfig:
    """Base of a stepper's own settings (a frozen dataclass in the stepper's file).

    `NAME` is the registered stepper name; `OPTIMIZERS` the `TrainConfig.optimizer` values it
    serves (the stepper "auto" picks); `LEGACY_PREFIX` the prefix of its flat keys of earlier
    releases (error messages name both spellings); `HEAD_LR` whether the stepper trains full
    trainable copies (a new task head) at `TrainConfig.head_lr` (one optimiser group each).
    """

    NAME: ClassVar[str] = ""
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ()
    LEGACY_PREFIX: ClassVar[str] = ""
    HEAD_LR: ClassVar[bool] = False

    def require(self, ok: bool, field: str, allowed: str, value: object) -> None:
        """Raise `ConfigError` naming `field` (nested and flat spelling) unless `ok`."""
        if not ok:
            legacy = f" (train.{self.LEGACY_PREFIX}{field})" if self.LEGACY_PREFIX else ""
            raise ConfigError(f"TrainConfig.stepper.{field}{legacy} of stepper {self.NAME!r} "
                              f"must be {allowed}, got {value!r}")

    def check(self, train: TrainConfig) -> None:
        """Checks that involve the rest of the run's config (e.g. a log needs `output_dir`)."""

    def to_dict(self) -> dict[str, Any]:
        """{"name": NAME, **fields}, JSON-able."""
        return {"name": self.NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        """Build from a dict (an optional "name" key is ignored); unknown keys are an error."""
        data = {k: v for k, v in data.items() if k != "name"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"stepper {cls.NAME!r} has no option(s) {unknown}; "
                              f"known: {sorted(known)}")
        return cls(**data)


_STEPPER_CONFIGS: dict[str, type[StepperConfig]] = {}


def register_stepper_config(cls: type[S]) -> type[S]:
    """Class decorator: make `cls` the config of stepper `cls.NAME`."""
    _STEPPER_CONFIGS[cls.NAME] = cls
    return cls


def stepper_configs() -> dict[str, type[StepperConfig]]:
    """Registered stepper configs by name (importing the built-in steppers registers theirs)."""
    # Imported here, not at the top: the steppers import this module.
    import petkit.training.steppers  # noqa: F401

    return _STEPPER_CONFIGS


def optimizers() -> list[str]:
    """Every `TrainConfig.optimizer` value some registered stepper serves."""
    return sorted({o for cls in stepper_configs().values() for o in cls.OPTIMIZERS})


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
