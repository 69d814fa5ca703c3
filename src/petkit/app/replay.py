"""`petkit replay`: rebuild a zeroth-order run's adapter from its (seed, gradient) log.

A run trained with `train.zo_log=true` leaves `output_dir/zo_log.jsonl` next to
`output_dir/recipe.yaml`. The recipe rebuilds the same base model and the same initial delta
(the pipeline seeds model loading and attach with `train.seed`); `replay_mezo` then redoes every
logged step without a forward pass, and the adapter is saved like a trained one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petkit.core.errors import ConfigError
from petkit.app.pipeline import method_config, prepare
from petkit.app.recipe import load_recipe
from petkit.app.run_folder import check_folder_path
from petkit.training.steppers.zeroth import replay_mezo
from petkit.core.io import save_adapter
from petkit.core.model import attach


def replay_run(log: str | Path, output: str | Path, steps: int | None = None,
               overwrite: bool = False) -> Path:
    """Replay `log` (the first `steps` steps, default all) and save the adapter to `output`;
    an existing non-empty `output` is refused (before any model loads) unless `overwrite`."""
    log = Path(log)
    check_folder_path(Path(output))
    if not overwrite and Path(output).is_dir() and any(Path(output).iterdir()):
        raise ConfigError(f"--output {output} is not empty; --overwrite replaces what it holds, "
                          f"or name a new folder")
    saved = log.parent / "recipe.yaml"
    if not log.is_file():
        raise ConfigError(f"--log {log}: no such file (a run with train.zo_log=true writes "
                          "output_dir/zo_log.jsonl)")
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: replay rebuilds the model from the recipe the "
                          "run saved next to its log")
    recipe = load_recipe(saved)
    torch.manual_seed(recipe.train.seed)  # as the run did: same new head and delta init
    prep, _ = prepare(recipe, with_train=False)
    attach(prep.model, method_config(recipe, prep))
    replay_mezo(prep.model, log, steps)
    return save_adapter(prep.model, output)
