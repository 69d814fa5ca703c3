"""The folder a `petkit train` run writes to: never an earlier run's unless the user asks.

A folder holds a run when it has an adapter, checkpoints or a run's `recipe.yaml`. Without
`--resume` or `--overwrite`:

- the default folder `runs/default`: the run moves on to the first free `runs/default-N` and
  says so, so running the README's command twice keeps both runs;
- a folder the user named: refused before any model loads, with what it holds and the ways on
  (`--resume` continues it, `--overwrite` replaces it, or another `--output`).

`pk.train` itself keeps its contract (an `output_dir` without `resume` starts afresh); this guard
is the CLI's, where a repeated command is the common mistake. Under torchrun rank 0 decides and
every rank gets its answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from petkit.app.recipe import Recipe
from petkit.core.errors import ConfigError
from petkit.training.checkpoint import checkpoint_dir, complete_checkpoints

DEFAULT_OUTPUT = "runs/default"


def earlier_run(folder: Path) -> str | None:
    """What an earlier run left in `folder` ("an adapter, checkpoints up to step-40"), or None."""
    held = []
    if (folder / "adapter").is_dir():
        held.append("an adapter")
    steps = complete_checkpoints(checkpoint_dir(folder))
    if steps:
        held.append(f"checkpoints up to {steps[-1].name}")
    if not held and (folder / "recipe.yaml").is_file():
        held.append("the recipe.yaml of a run that saved nothing yet")
    return ", ".join(held) or None


def choose_output(recipe: Recipe, overwrite: bool, echo: Callable[[str], None]) -> Path:
    """The folder this run may write to, as the module docstring says."""
    train = recipe.train
    folder = Path(train.output_dir or DEFAULT_OUTPUT)
    held = None if train.resume or overwrite else earlier_run(folder)
    if held is None:
        return folder
    if folder == Path(DEFAULT_OUTPUT):
        n = 2
        while earlier_run(Path(f"{folder}-{n}")) is not None:
            n += 1
        free = Path(f"{folder}-{n}")
        echo(f"{folder} holds an earlier run ({held}); this run writes to {free} "
             f"(--output DIR names the folder; --overwrite replaces the earlier run)")
        return free
    raise ConfigError(f"{folder} already holds a run ({held}); --resume continues it, "
                      f"--overwrite replaces it, or name another folder with --output")


def claim_output(recipe: Recipe, overwrite: bool, echo: Callable[[str], None]) -> Recipe:
    """`recipe` with the folder it may write to (`choose_output`); under torchrun, rank 0's
    choice (or error) on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        folder = choose_output(recipe, overwrite, echo)
    else:
        answer: list[object] = [None]
        if dist.get_rank() == 0:
            try:
                answer[0] = str(choose_output(recipe, overwrite, echo))
            except ConfigError as error:
                answer[0] = error
        dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], ConfigError):
            raise answer[0]
        folder = Path(str(answer[0]))
    return dataclasses.replace(recipe, train=recipe.train.replace(output_dir=str(folder)))
