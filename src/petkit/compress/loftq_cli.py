"""`petkit train --method lora --method.init loftq [--model.quantize nf4|fp4|int8]`: LoftQ from the CLI.

LoftQ (`pk.loftq`, models/loftq.py) needs the full-precision base after the LoRA is attached: it
quantises each LoRA layer's base and starts A, B at what quantisation lost. The pipeline quantises
`model.quantize` before attaching, so the run goes without it and the hook below quantises LoftQ's
way once the adapter is attached (default nf4), and the other linear layers as `pk.quantize` does.
With one iteration the quantised base is then exactly `pk.quantize(model, mode)`'s, so after training the run's `recipe.yaml` records `model.quantize` again: `petkit
eval / merge / serve` of the run rebuild the base the adapter belongs to.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from petkit.app.pipeline import Prepared, RunHooks
from petkit.app.recipe import Recipe, load_recipe
from petkit.models.loftq import loftq


def wants_loftq(recipe: Recipe) -> bool:
    """A LoRA run whose factors start LoftQ's way."""
    return getattr(recipe.method_config(), "init", None) == "loftq"


def loftq_run(recipe: Recipe) -> tuple[Recipe, RunHooks]:
    """(the recipe to run, without model.quantize; the hooks that quantise LoftQ's way)."""
    mode = recipe.model.quantize or "nf4"
    run = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantize=None))

    def trained(prep: Prepared, output: Path) -> dict[str, Any]:
        saved = output / "recipe.yaml"
        if saved.is_file():  # the base the adapter belongs to: the LoftQ-quantised one
            kept = load_recipe(saved)
            kept = dataclasses.replace(kept, model=dataclasses.replace(kept.model, quantize=mode))
            saved.write_text(kept.to_yaml(), encoding="utf-8")
        return {"base": f"quantised {mode} by LoftQ (recipe.yaml: model.quantize={mode})"}

    return run, RunHooks(attached=lambda prep: loftq(prep.model, mode, all_linear=True), trained=trained)
