"""Nested training config: each stepper's own config, IST's, legacy flat keys, overrides."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest

from petkit.app.recipe import Recipe, apply_overrides, recipe_from_dict
from petkit.core.errors import ConfigError
from petkit.training import TrainConfig, make_stepper, register_stepper
from petkit.training.steppers.base import StepperConfig
from petkit.training.steppers.ist import IstConfig
from petkit.training.steppers.backprop import BackpropConfig
from petkit.training.steppers.cma_es import CmaConfig
from petkit.training.steppers.zeroth import ZOConfig, ZOStepper
from tests.toys import llama


def test_optimizer_picks_the_stepper_config() -> None:
    assert TrainConfig().stepper == BackpropConfig()
    assert TrainConfig(optimizer="mezo").stepper == ZOConfig()
    assert TrainConfig(optimizer="cma", stepper="cma").stepper == CmaConfig()
    cfg = TrainConfig(optimizer="mezo", stepper=ZOConfig(eps=1e-2, n_spsa=3))
    assert cfg.stepper_name() == "zo" and cfg.stepper.eps == 1e-2


def test_default_stepper_config_follows_the_optimizer_a_tuned_one_must_match() -> None:
    assert TrainConfig().replace(optimizer="mezo").stepper == ZOConfig()
    with pytest.raises(ConfigError, match="stepper"):
        TrainConfig(optimizer="adamw", stepper=ZOConfig(eps=1e-2))
    with pytest.raises(ConfigError, match="stepper"):
        TrainConfig(optimizer="mezo", stepper="cma")
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_json_round_trip_is_nested() -> None:
    cfg = TrainConfig(optimizer="zo-adam", stepper=ZOConfig(eps=0.05), ist=None, lr=1e-3)
    data = json.loads(cfg.to_json())
    assert data["stepper"] == {"name": "zo", "eps": 0.05, "n_spsa": 1, "momentum": 0.0,
                               "log": False}
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    ist = TrainConfig(ist=IstConfig(top_k=2, every=5))
    assert TrainConfig.from_dict(ist.to_dict()) == ist


@pytest.mark.parametrize("flat,nested", [
    ({"optimizer": "mezo", "zo_eps": 0.01, "zo_n_spsa": 2},
     {"optimizer": "mezo", "stepper": ZOConfig(eps=0.01, n_spsa=2)}),
    ({"optimizer": "cma", "es_dim": 8, "es_sigma": 0.1},
     {"optimizer": "cma", "stepper": CmaConfig(dim=8, sigma=0.1)}),
    ({"ist_top_k": 2, "ist_every": 3}, {"ist": IstConfig(top_k=2, every=3)})])
def test_flat_keys_of_earlier_releases_map_with_a_warning(flat: dict[str, Any],
                                                         nested: dict[str, Any]) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert TrainConfig(**flat) == TrainConfig(**nested)
    with pytest.warns(DeprecationWarning):
        assert TrainConfig.from_dict(flat) == TrainConfig(**nested)


def test_recipe_overrides_reach_nested_and_flat_options() -> None:
    recipe = Recipe()
    nested = apply_overrides(recipe, {"train.stepper.eps": "0.02", "train.optimizer": "mezo",
                                      "train.ist.top_k": "2"})
    assert nested.train.stepper == ZOConfig(eps=0.02) and nested.train.ist == IstConfig(top_k=2)
    with pytest.warns(DeprecationWarning):
        flat = apply_overrides(recipe, {"train.optimizer": "mezo", "train.zo_eps": "0.02",
                                        "train.ist_top_k": "2"})
    assert flat.train == nested.train
    with pytest.raises(ConfigError, match="stepper fields"):
        apply_overrides(recipe, {"train.stepper.eps": "0.02"})  # adamw has no eps
    with pytest.raises(ConfigError, match="top_k"):
        apply_overrides(recipe, {"train.ist.every": "3"})
    yaml_style = recipe_from_dict({"train": {"optimizer": "cma", "stepper": {"dim": 4}}})
    assert yaml_style.train.stepper == CmaConfig(dim=4)


def test_a_stepper_with_its_own_config_is_one_registration() -> None:
    @dataclasses.dataclass(frozen=True)
    class HalvingConfig(StepperConfig):
        NAME: ClassVar[str] = "halving-test"
        OPTIMIZERS: ClassVar[tuple[str, ...]] = ("halving",)
        factor: float = 0.5

    @register_stepper("halving-test", config=HalvingConfig)
    def make(params: Any, config: TrainConfig, total: int) -> Any:
        return ("halving", config.stepper.factor)

    cfg = TrainConfig(optimizer="halving", stepper={"factor": 0.25})
    assert cfg.stepper == HalvingConfig(factor=0.25)
    assert make_stepper({}, cfg, 1) == ("halving", 0.25)
    params = dict(llama().named_parameters())
    assert isinstance(make_stepper(params, TrainConfig(optimizer="mezo"), 1), ZOStepper)
