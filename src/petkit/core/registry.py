"""Method registry and the config base class every method's config derives from."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from torch import nn

from .config_io import dataclass_from_dict
from .discovery import Discovered
from .errors import ConfigError, did_you_mean



@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str  # additive | selective | reparameterised | hybrid
    paper: str
    config_cls: type["MethodConfig"]


# Registered methods by name. The first lookup imports the modules that register them: petkit's
# own `petkit.methods` (one module per method) and every module a package declares under the
# `petkit.methods` entry-point group (a plugin's methods). So registration is one explicit step of
# the registry, not a side effect of importing the facade, and `core` names no module above it.
METHODS: Discovered[MethodInfo] = Discovered("method", builtin="petkit.methods",
                                             group="petkit.methods")
C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method has. Subclasses add theirs and implement `inject`.

    targets: None means the method's defaults for the model's architecture.
    modules_to_save: modules (e.g. a new classification head) trained as a full copy that
    belongs to this adapter.
    applies_to: the model kinds ("decoder", "encoder") the method is meant for; benchmarks
    (`benchmarks/methods_table.py`) skip the others with a note.
    suggested_lr: the AdamW learning rate this method wants when it differs from LoRA's (soft
    prompts and prefixes need 3-10x larger steps); `petkit train --method NAME` uses it unless a
    learning rate is given, and the methods table trains with it. None: the recipe's rate.
    capabilities: the Protocols of `core.capabilities` this method's wrappers (and config) satisfy
    beyond the delta contract; the contract table checks each claim.
    peft_layout: how the adapter reads as a Hugging Face PEFT folder; None where PEFT has no such
    method (`pk.export_peft` refuses it).
    """

    targets: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    method: ClassVar[str] = ""
    applies_to: ClassVar[tuple[str, ...]] = ("decoder", "encoder")
    suggested_lr: ClassVar[float | None] = None
    capabilities: ClassVar[tuple[type, ...]] = ()
    # a core.capabilities.PeftLayout, or None: PEFT has no such method (typed Any here, since
    # capabilities imports this module; get_type_hints of every config must resolve)
    peft_layout: ClassVar[Any] = None

    def __post_init__(self) -> None:
        for f in fields(self):  # lists from JSON/YAML become tuples: configs stay hashable
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{type(self).__name__}.{f.name} must be a finite number, got {value!r}")
        if self.targets is not None and not isinstance(self.targets, (str, tuple)):
            raise ConfigError(f"targets must be a list of names, a regex string or None, got {self.targets!r}")
        if isinstance(self.targets, tuple) and not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets must hold non-empty strings, got {self.targets!r}")
        if not isinstance(self.modules_to_save, tuple) or not all(
                isinstance(m, str) and m for m in self.modules_to_save):
            raise ConfigError("modules_to_save must be a list of non-empty module names, got "
                              f"{self.modules_to_save!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and its allowed range."""

    def inject(self, model: nn.Module, name: str) -> list[str]:
        """Wrap/extend the model for adapter `name`; return the canonical paths it touched."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json(self) -> str:
        return json.dumps({"method": self.method, **self.to_dict()}, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        return dataclass_from_dict(cls, data, cls.__name__, ignore=("method",))


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                *, kind: type | tuple[type, ...] = (int, float), low_open: bool = False) -> None:
    """Raise ConfigError unless `value` is of `kind` and inside [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {high}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def register(name: str, *, family: str, paper: str) -> Callable[[C], C]:
    """Class decorator: register a MethodConfig subclass under a short name."""

    def deco(cls: C) -> C:
        METHODS.add(name, MethodInfo(name, family, paper, cls))
        cls.method = name
        return cls

    return deco


def suggested_lr(name: str) -> float | None:
    """The registered method's `suggested_lr`; None for no suggestion or an unknown name."""
    info = METHODS.get(name)
    return None if info is None else info.config_cls.suggested_lr


def list_methods() -> list[tuple[str, str, str]]:
    """(name, family, paper) of every registered method, sorted by name."""
    return sorted((m.name, m.family, m.paper) for m in METHODS.values())


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; registered: "
                          f"{', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_config(method: str, **kwargs: Any) -> MethodConfig:
    """Build a method's config by its registered name: `make_config("lora", r=8)`."""
    return get_method(method).config_cls.from_dict(kwargs)


def config_from_json(data: dict[str, Any]) -> MethodConfig:
    if "method" not in data:
        raise ConfigError("config JSON has no 'method' field")
    return get_method(data["method"]).config_cls.from_dict(data)
