"""Recipes: every shipped recipe loads and validates; dotted overrides are typed and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.app.recipe import (Recipe, apply_overrides, builtin_recipes, load_recipe,
                                 parse_value, recipe_from_dict)

SHIPPED = sorted(builtin_recipes())


def test_the_expected_recipes_ship() -> None:
    assert {"default", "minilm-bbc", "chatterbot-instruct"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    config = recipe.method_config()
    assert config.method == recipe.method_name
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert recipe.train.output_dir, "shipped recipes say where they write"


def test_overrides_are_typed_by_the_config_fields() -> None:
    recipe = apply_overrides(Recipe(), {"train.lr": "1e-4", "method.r": "16",
                                        "method.targets": "[q_proj, k_proj]",
                                        "data.train_size": "64", "train.resume": "true",
                                        "train.output_dir": "out"})
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.method_config().r == 16
    assert tuple(recipe.method_config().targets) == ("q_proj", "k_proj")
    assert recipe.data.train_size == 64 and recipe.train.resume is True
    assert parse_value("1e-3", float) == 1e-3 and parse_value("none") is None
    assert parse_value("none", str) == "none" and parse_value("none", str | None) is None


def test_none_is_a_word_for_a_text_field_and_none_for_an_optional_one() -> None:
    """`--runtime.kernels=none` (a str field whose choices include "none") reaches the field
    as the word; `--runtime.loss_chunk=none` (int or None) as None."""
    recipe = apply_overrides(load_recipe("default"), {
        "runtime.kernels": "none", "runtime.offload_optimizer": "none",
        "runtime.activation_quantization": "none", "runtime.loss_chunk": "none"})
    runtime = recipe.runtime
    assert (runtime.kernels, runtime.offload_optimizer) == ("none", "none")
    assert runtime.activation_quantization == "none" and runtime.loss_chunk is None


def test_switching_method_resets_its_fields() -> None:
    recipe = apply_overrides(load_recipe("default"), {"method.name": "bitfit"})
    assert recipe.method == {"name": "bitfit"}
    assert isinstance(recipe.method_config(), pk.MethodConfig)


@pytest.mark.parametrize("overrides,match", [
    ({"train.learning_rate": "1"}, "learning_rate"),
    ({"optim.lr": "1"}, "section"),
    ({"train.lr": "-1"}, "lr"),
    ({"data.task_type": "regression"}, "task_type"),
    ({"method.r": "0"}, "r"),
    ({"method.name": "nope"}, "nope"),
])
def test_bad_overrides_name_the_field(overrides: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Recipe(), overrides).method_config()


def test_bad_recipe_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: 1e-3, epochz: 2}\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_recipe(bad)
    bad.write_text("optimizer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="section"):
        load_recipe(bad)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="shipped"):
        load_recipe("no-such-recipe")
