"""The folder a `petkit train` run writes to: never an earlier run's unless the user asks.

A folder holds a run when it has an adapter, checkpoints or a run's `recipe.yaml`. Without
`--resume` or `--overwrite`:

- the default folder `runs/default`: the run moves on to the first free `runs/default-N` and
  says so, so running the README's command twice keeps both runs;
- a folder the user named: refused before any model loads, with what it holds and the ways on
  (`--resume` continues it, `--overwrite` replaces it, or another `--output`).

With `--resume` the run continues exactly as the folder's own `recipe.yaml` says (`resume_recipe`):
data, columns, model, method and schedule come from the folder, never from the defaults, and a flag
that would change one of them is refused before any model loads unless `--resume-override` names
it. A folder with no checkpoint has nothing to resume: refused, saying why and what to run instead.

`pk.train` itself keeps its contract (an `output_dir` without `resume` starts afresh); this guard
is the CLI's, where a repeated command is the common mistake. Under torchrun rank 0 decides and
every rank gets its answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from petkit.app.recipe import Recipe, apply_overrides, load_recipe
from petkit.core.errors import ConfigError
from petkit.training.checkpoint import checkpoint_dir, complete_checkpoints

DEFAULT_OUTPUT = "runs/default"
# Where and how a resumed run executes, not what it computes: free to change on resume.
RESUME_FREE = frozenset({"train.resume", "train.resume_override", "train.progress",
                         "train.output_dir", "train.device", "train.distributed",
                         "train.eval_batch_size", "train.log_every"})
# What a bare `--resume-override` accepts (the schedule; see training/checkpoint.py SCHEDULE).
SCHEDULE_FIELDS = ("train.max_steps", "train.epochs", "train.lr", "train.head_lr",
                   "train.schedule", "train.warmup_steps", "train.warmup_ratio",
                   "train.weight_decay", "train.max_grad_norm", "train.batch_size",
                   "train.grad_accum")


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


def check_folder_path(folder: Path, flag: str = "--output") -> None:
    """`folder` must be a folder or not exist yet (a file of that name is refused)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file, not a folder: name a folder "
                          f"(it is created if it does not exist)")
    for parent in folder.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {folder}: {parent} is a file, so no folder can be made there")


def claim_folder(folder: Path, *, default: bool, overwrite: bool,
                 held_by: Callable[[Path], str | None], echo: Callable[[str], None],
                 ways: str = "") -> Path:
    """`folder`, unless it holds an earlier run (`held_by` says what) and `overwrite` is off:
    then a `default` folder moves on to the first free `folder-N` and says so, and a folder the
    user named is refused (`ways`: how else to go on, e.g. "--resume continues it, ")."""
    check_folder_path(folder)
    held = None if overwrite else held_by(folder)
    if held is None:
        return folder
    if default:
        n = 2
        while held_by(Path(f"{folder}-{n}")) is not None:
            n += 1
        free = Path(f"{folder}-{n}")
        echo(f"{folder} holds an earlier run ({held}); this run writes to {free} "
             f"(--output DIR names the folder; --overwrite replaces the earlier run)")
        return free
    raise ConfigError(f"{folder} already holds a run ({held}); {ways}--overwrite replaces it, "
                      f"or name another folder with --output")


def choose_output(recipe: Recipe, overwrite: bool, echo: Callable[[str], None]) -> Path:
    """The folder this run may write to, as the module docstring says."""
    folder = Path(recipe.train.output_dir or DEFAULT_OUTPUT)
    ways = "--resume continues it, " if complete_checkpoints(checkpoint_dir(folder)) else ""
    return claim_folder(folder, default=folder == Path(DEFAULT_OUTPUT),
                        overwrite=overwrite or recipe.train.resume, held_by=earlier_run,
                        echo=echo, ways=ways)


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


def _flat(recipe: Recipe) -> dict[str, Any]:
    """Every field of `recipe` as "section.field" (nested train options: "train.stepper.eps")."""
    out: dict[str, Any] = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if isinstance(value, dict) and section == "train":
                out.update({f"train.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{section}.{key}"] = value
    return out


def resume_recipe(folder: Path, overrides: dict[str, str], allowed: Iterable[str]) -> Recipe:
    """The run in `folder` to continue: its own `recipe.yaml` with `overrides` applied.

    Refused (before any model loads) when the folder holds no run or no checkpoint, or when an
    override changes what the run computes and `allowed` (dotted keys) does not name it.
    """
    check_folder_path(folder)
    saved_file = folder / "recipe.yaml"
    if not saved_file.is_file():
        held = "does not exist" if not folder.exists() else "holds no run (no recipe.yaml)"
        raise ConfigError(f"--resume: {folder} {held}, so there is nothing to continue; "
                          f"drop --resume to start a new run there")
    if not complete_checkpoints(checkpoint_dir(folder)):
        done = " (the run finished and saved its adapter)" if (folder / "adapter").is_dir() else ""
        raise ConfigError(
            f"--resume: {folder} has no checkpoint to continue from{done}; it saved none "
            f"(checkpoints are written with --train.save_every=N). To train again from its "
            f"recipe: petkit train --recipe {saved_file} --output NEW_FOLDER "
            f"(--overwrite replaces this run instead)")
    saved = load_recipe(saved_file)
    wanted = apply_overrides(saved, {**overrides, "train.output_dir": str(folder),
                                     "train.resume": "true"})
    before, after = _flat(saved), _flat(wanted)
    changed = {k: (before.get(k), v) for k, v in after.items()
               if before.get(k) != v and k not in RESUME_FREE}
    allowed = set(allowed)
    refused = {k: v for k, v in changed.items() if k not in allowed
               and not any(k.startswith(a + ".") for a in allowed)}
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"--resume continues the run in {folder} exactly as its recipe.yaml says; this "
            f"command would change {listed}. Drop those options, or name them with "
            f"--resume-override={','.join(refused)} (the run then no longer continues exactly)")
    if changed:
        wanted = dataclasses.replace(wanted, train=wanted.train.replace(resume_override=True))
    return wanted
