"""`--train.<key>=value` overrides: the type of a train option and how to set it in a recipe's
train section (flat fields, the nested `stepper.` / `ist.` / `objective.` sections, and the legacy flat keys)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from petkit.core.errors import ConfigError
from petkit.training.config import LEGACY_KEYS, TrainConfig
from petkit.training.dp import DPConfig
from petkit.training.runtime import RUNTIME_FIELDS, RuntimeConfig
from petkit.training.sections import resolve_stepper, stepper_configs
from petkit.training.steppers.ist import IstConfig
from petkit.training.objectives_config import ObjectiveConfig


def option_type(train: dict[str, Any], key: str) -> Any:
    """The annotation of train option `key` ("lr", "stepper.eps", "ist.top_k", or a flat legacy
    key) given the train section `train` (its optimizer picks the stepper); `ConfigError` if
    there is no such option."""
    head, _, rest = key.partition(".")
    if not rest:
        hints = typing.get_type_hints(TrainConfig)
        if key in LEGACY_KEYS:
            owner, rest = LEGACY_KEYS[key]
            head = "stepper" if owner != "ist" else "ist"
            if owner != "ist":
                return typing.get_type_hints(stepper_configs()[owner])[rest]
        elif key in {f.name for f in dataclasses.fields(TrainConfig)}:
            return hints[key]
        elif key in RUNTIME_FIELDS:  # moved to the runtime section: accepted, with a warning
            return typing.get_type_hints(RuntimeConfig)[key]
        else:
            known = sorted({f.name for f in dataclasses.fields(TrainConfig)} | set(LEGACY_KEYS))
            raise ConfigError(f"unknown option --train.{key}; train fields: {known}")
    if head == "ist":
        cls: type = IstConfig
    elif head == "dp":
        cls = DPConfig
    elif head == "objective":
        cls = ObjectiveConfig
    elif head == "stepper":
        cls = type(resolve_stepper(train.get("optimizer", "adamw"), train.get("stepper", "auto")))
    else:
        raise ConfigError(f"unknown option --train.{key}; nested sections: stepper, ist, dp, objective")
    hints = typing.get_type_hints(cls)
    if rest not in hints or rest.isupper():
        raise ConfigError(f"unknown option --train.{key}; {head} fields: "
                          f"{sorted(f.name for f in dataclasses.fields(cls))}")
    return hints[rest]


def set_option(train: dict[str, Any], key: str, value: Any) -> None:
    """Set train option `key` (see `option_type`) in the train section dict `train`."""
    head, _, rest = key.partition(".")
    if not rest:
        train[key] = value
        return
    if head in ("ist", "dp"):
        train[head] = {**(train.get(head) or {}), rest: value}
        return
    if head == "objective":
        current = train.get("objective") or {}
        current = {"name": current} if isinstance(current, str) else current
        train["objective"] = {**current, rest: value}
        return
    current = resolve_stepper(train.get("optimizer", "adamw"), train.get("stepper", "auto"))
    train["stepper"] = {**current.to_dict(), rest: value}
