"""The stepper contract: the `Stepper` Protocol, its optional hooks, the `StepperConfig` base of
a stepper's own settings, and the registry both are entered in.

Nothing here imports a stepper or the run's config, so every stepper file imports this module
and nothing imports a stepper file back (`steppers/__init__.py` imports them all to register
them; `training/sections.py` resolves an optimizer to its stepper from the registry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from petkit.core.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the config resolves its stepper through the registry here
    from petkit.training.config import TrainConfig

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]
S = TypeVar("S", bound="StepperConfig")


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


# Optional hooks: a stepper (or objective) that has one declares it by defining the method; the
# loop checks them with isinstance, never by probing attribute names.
@runtime_checkable
class BindsModel(Protocol):
    """`bind_model(model)`: called once before the first step (a population stepper batches
    its forward passes; backprop groups a head's and LoRA+'s parameters)."""

    def bind_model(self, model: nn.Module) -> None: ...


@runtime_checkable
class LogsFields(Protocol):
    """`log_fields()`: extra columns of each train log row (a stepper's or an objective's)."""

    def log_fields(self) -> dict[str, Any]: ...


@runtime_checkable
class Reports(Protocol):
    """`report()`: numbers for the run's summary (`TrainResult.report`)."""

    def report(self) -> dict[str, Any]: ...


@runtime_checkable
class WritesLog(Protocol):
    """A stepper config with a `log` switch: the stepper writes its own log file (only rank 0
    keeps it under torchrun)."""

    log: bool


def log_fields(obj: object) -> dict[str, Any]:
    """`obj.log_fields()` when it declares the hook (`LogsFields`), else nothing."""
    return obj.log_fields() if isinstance(obj, LogsFields) else {}


def report(obj: object) -> dict[str, Any]:
    """`obj.report()` when it declares the hook (`Reports`), else nothing."""
    return obj.report() if isinstance(obj, Reports) else {}


def bind_model(stepper: object, model: nn.Module) -> None:
    """`stepper.bind_model(model)` when it declares the hook (`BindsModel`)."""
    if isinstance(stepper, BindsModel):
        stepper.bind_model(model)


@dataclass(frozen=True)
class StepperConfig:
    """Base of a stepper's own settings (a frozen dataclass in the stepper's file).

    `NAME` is the registered stepper name; `OPTIMIZERS` the `TrainConfig.optimizer` values it
    serves (the stepper "auto" picks); `LEGACY_PREFIX` the prefix of its flat keys of earlier
    releases (error messages name both spellings); `HEAD_LR` whether the stepper trains full
    trainable copies (a new task head) at `TrainConfig.head_lr` (one optimiser group each);
    `GRADIENT_FREE` whether it updates without backpropagation (forward passes only).
    """

    NAME: ClassVar[str] = ""
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ()
    LEGACY_PREFIX: ClassVar[str] = ""
    HEAD_LR: ClassVar[bool] = False
    GRADIENT_FREE: ClassVar[bool] = False

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


StepperFactory = Callable[[dict[str, nn.Parameter], "TrainConfig", int], Stepper]
_FACTORIES: dict[str, StepperFactory] = {}
_CONFIGS: dict[str, type[StepperConfig]] = {}


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
    _CONFIGS[name] = config

    def decorate(factory: StepperFactory) -> StepperFactory:
        _FACTORIES[name] = factory
        return factory

    return decorate


def registered_configs() -> dict[str, type[StepperConfig]]:
    """Stepper configs registered so far, by name (`sections.stepper_configs` imports the
    built-in steppers first)."""
    return _CONFIGS


def registered_factories() -> dict[str, StepperFactory]:
    """Stepper factories registered so far, by name."""
    return _FACTORIES
