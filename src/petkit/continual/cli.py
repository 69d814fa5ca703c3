"""`petkit continual`: the subcommand's flags and what it does (imports nothing optional).

    petkit continual --tasks bbc-classes --strategy hide --output runs/cl-hide
    petkit continual --tasks rotten-tomatoes,bbc-news,convention-party --method lora \\
        --strategy o-lora --method.r=8 --option ortho_weight=1.0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petkit.app.aliases import named_overrides
from petkit.core.errors import ConfigError

STRATEGY_NAMES = ("sequential", "multitask", "per-task", "o-lora", "inflora", "hide", "conpet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `petkit continual`."""
    parser.add_argument("--tasks", dest="cl_tasks", metavar="SPEC", required=True,
                        help="a sequence (bbc-classes, domains) or TASK,TASK,... where TASK is an "
                             "embedded task, convention-party or a data file, optionally "
                             ":CLASS+CLASS (e.g. bbc-news:business+tech)")
    parser.add_argument("--strategy", dest="cl_strategy", metavar="NAME", default="sequential",
                        help=f"one of {', '.join(STRATEGY_NAMES)} (default sequential)")
    parser.add_argument("--recipe", dest="cl_recipe", metavar="NAME|FILE", default=None,
                        help="a training recipe (YAML file or shipped name) whose method, model, "
                             "train and runtime sections the run takes (default: LoRA on "
                             "minilm-l6, lr 1e-3, 60 steps per task, batch 16)")
    parser.add_argument("--method", dest="cl_method", metavar="NAME", default=None,
                        help="PET method per task (default lora; o-lora/inflora need the LoRA "
                             "family); set its fields with --method.FIELD=VALUE")
    parser.add_argument("--model", dest="cl_model", metavar="NAME", default=None,
                        help="encoder (default minilm-l6, embedded)")
    parser.add_argument("--output", dest="cl_output", metavar="DIR", default=None,
                        help="run folder (default runs/continual-<strategy>, moving on to -2, -3 "
                             "... when it holds a run; a named folder holding one is refused)")
    parser.add_argument("--overwrite", dest="cl_overwrite", action="store_true",
                        help="replace the run already in --output")
    parser.add_argument("--steps", dest="cl_steps", metavar="N", type=int, default=None,
                        help="optimiser steps per task (train.max_steps; default 60)")
    parser.add_argument("--lr", dest="cl_lr", metavar="LR", type=float, default=None,
                        help="train.lr (default 1e-3)")
    parser.add_argument("--batch-size", dest="cl_batch_size", metavar="N", type=int, default=None,
                        help="train.batch_size (default 16)")
    parser.add_argument("--seed", dest="cl_seed", metavar="N", type=int, default=None,
                        help="train.seed (default 0)")
    parser.add_argument("--max-train", dest="cl_max_train", metavar="N", type=int, default=400,
                        help="train examples per task (default 400)")
    parser.add_argument("--max-test", dest="cl_max_test", metavar="N", type=int, default=200,
                        help="test examples per task (default 200)")
    parser.add_argument("--max-length", dest="cl_max_length", metavar="N", type=int, default=64)
    parser.add_argument("--option", dest="cl_options", action="append", default=[],
                        metavar="KEY=VALUE", help="strategy knob: ortho_weight, "
                        "inflora_threshold, pool, replay (repeatable)")


def _value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """["pool=2", "replay=16"] -> {"pool": 2, "replay": 16}."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--option must look like KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


# The short flags of the recipe sections here: argparse dest -> row of app/aliases.py ALIASES.
NAMED = {"cl_method": "method", "cl_model": "model", "cl_steps": "steps", "cl_lr": "lr",
         "cl_batch_size": "batch_size", "cl_seed": "seed"}
SECTIONS = ("method.", "train.", "runtime.", "model.")  # what --section.field may set here


def continual_recipe(named: dict[str, str], dotted: dict[str, str],
                     recipe: str | None = None) -> Any:
    """The run's recipe: `recipe` (a YAML file or shipped name; default
    `strategy.default_recipe()`) with the short flags' fields (`named`) and then the
    `--method.F`, `--model.F`, `--train.F` and `--runtime.F` options applied."""
    from petkit.app.recipe import DataSpec, apply_overrides, load_recipe  # only when it runs
    from petkit.continual.strategy import default_recipe

    others = sorted(k for k in dotted if not k.startswith(SECTIONS))
    if others:
        raise ConfigError(f"petkit continual takes only --method.FIELD, --train.FIELD, "
                          f"--runtime.FIELD and --model.FIELD overrides, got {others}")
    base = load_recipe(recipe) if recipe else default_recipe()
    if base.data != DataSpec():
        raise ConfigError(f"--recipe {recipe}: petkit continual takes its tasks from --tasks "
                          "(and --max-train, --max-test, --max-length); drop its data: section")
    overrides = {**named, **dotted}
    return apply_overrides(base, overrides) if overrides else base


def method_overrides(dotted: dict[str, str]) -> dict[str, Any]:
    """`--method.r=16` -> {"r": 16}, typed by the method's config."""
    method = continual_recipe({}, dotted).method
    return {k: v for k, v in method.items() if k != "name"}


def train_section(dotted: dict[str, str]) -> Any:
    """The run's TrainConfig: the continual default with `--train.F` / `--runtime.F` applied."""
    return continual_recipe({}, dotted).train


def _earlier_run(folder: Path) -> str | None:
    """What an earlier `petkit continual` left in `folder`, or None."""
    held = [what for what, name in (("results", "results.json"), ("adapters", "adapters"))
            if (folder / name).exists()]
    return " and ".join(held) or None


def command(args: argparse.Namespace, dotted: dict[str, str],
            echo: Callable[[str], None] = print) -> list[str]:
    """Run the sequence (`echo`: where the run goes, said before it starts); return the lines to
    print (matrix and metrics)."""
    from petkit.app.run_folder import claim_folder  # the run's modules: only when it runs
    from petkit.continual.run import run_continual

    recipe = continual_recipe(named_overrides(vars(args), NAMED), dotted,
                              getattr(args, "cl_recipe", None))
    out = claim_folder(Path(args.cl_output or f"runs/continual-{args.cl_strategy}"),
                       default=args.cl_output is None, overwrite=args.cl_overwrite,
                       held_by=_earlier_run, echo=echo)
    result = run_continual(
        args.cl_tasks, args.cl_strategy, recipe=recipe, output_dir=out,
        max_train=args.cl_max_train, max_test=args.cl_max_test, max_length=args.cl_max_length,
        options=parse_options(args.cl_options), progress=True)
    lines = [f"accuracy a[t][i] ({'task id given' if result.uses_task_id else 'no task id'}):"]
    for t, row in enumerate(result.matrix):
        cells = " ".join("   -  " if v is None else f"{100 * v:5.1f}%" for v in row)
        lines.append(f"  after {t + 1}: {cells}")
    for label, metrics in (("no task id", result.metrics),
                           ("task id given", result.metrics_task_aware)):
        parts = [f"{k.replace('_', ' ')} {'n/a' if v is None else f'{100 * v:.1f}'}"
                 for k, v in metrics.items()]
        lines.append(f"{label}: " + ", ".join(parts))
    lines.append(f"results: {out}/results.json, plot: {out}/accuracy.png, adapters: {out}/adapters")
    return lines
