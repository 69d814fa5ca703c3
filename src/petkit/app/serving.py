"""The base model `petkit chat`, `generate` and `serve` answer with, prepared by the pipeline
that prepares `petkit train` and `eval`'s (`app.pipeline.load_base`): the recipe's model section
(its name; `quantize` for adapters trained on a quantised base, read from the adapter's run as
`petkit eval` reads it) and its runtime section's device.

A serving command reads no other field: one set for it (`--runtime.packing=true`) is refused
with the list of what it reads, rather than silently ignored. Precision stays the base's own:
an adapter's fingerprint is of the base's weights as loaded, so a bf16 copy would refuse them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from petkit.app.adapter_base import recipe_for_adapter
from petkit.app.pipeline import load_base
from petkit.app.recipe import ModelSpec, Recipe, apply_overrides
from petkit.core.errors import ConfigError
from petkit.models.quantize import quantize
from petkit.training.placement import resolve_device

READS = ("model.name", "model.quantize", "runtime.device")  # what serving takes of a recipe


def serving_recipe(model: str, overrides: dict[str, str], command: str = "serve",
                   adapter: str | Path | None = None) -> Recipe:
    """The recipe of a serving command: base `model` (with `adapter`, the adapter it was trained
    for, when --model was not given: the `model.quantize` its run recorded, read as `petkit
    eval` reads it) and the `--model.F` / `--runtime.F` options in `overrides` (only those in
    `READS`)."""
    unread = [key for key in overrides if key not in READS]
    if unread:
        raise ConfigError(f"petkit {command} reads only {', '.join('--' + k for k in READS)}; "
                          f"--{unread[0]} applies to training runs")
    quantize = recipe_for_adapter(adapter, model_given=True).model.quantize if adapter else None
    return apply_overrides(Recipe(model=ModelSpec(model, quantize=quantize)), overrides)


def serving_base(recipe: Recipe) -> tuple[nn.Module, Any]:
    """The recipe's base as a causal LM with its tokenizer, quantised as `model.quantize` says,
    on `runtime.device` ("auto": a GPU when there is one)."""
    model, tokenizer = load_base(recipe.model.name, "instruction")
    if recipe.model.quantize:  # the base the adapters were trained on (their fingerprints)
        quantize(model, recipe.model.quantize)
    return model.to(resolve_device(recipe.runtime.device, model)), tokenizer
