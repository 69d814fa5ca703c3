"""What each `petkit` subcommand does, once its arguments are parsed: call the library, print.

Kept apart from `petkit.cli` (the parser and `main`) so that `petkit --help` and a mistake in
the arguments cost no torch or transformers import: `main` imports this module only to run a
command.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from transformers.utils import logging as hf_logging

from petkit import cli_adapter as adapter_cli
from petkit.app.export import merge_to_folder
from petkit.app.adapter_base import recipe_for_adapter
from petkit.app.objective_run import (evaluate_objective_adapter, is_objective_run, objective_of,
                                      objective_switch, run_objective_recipe)
from petkit.app.pipeline import load_with_adapter, method_config, needs_data, run_recipe, test_metrics
from petkit.app.rank_sweep import check_ranks, evaluate_at_ranks, parse_ranks, write_sweep
from petkit.app.recipe import apply_overrides, load_recipe
from petkit.app.replay import replay_run
from petkit.app.run_folder import DEFAULT_OUTPUT, SCHEDULE_FIELDS, claim_output, resume_recipe
from petkit.benchmark import cli as bench_cli
from petkit.cli_flags import FLAGS
from petkit.cli_io import OUT, UsageError
from petkit.cli_sections import values as section_values
from petkit.compress.cli import pruning_hooks
from petkit.compress.loftq_cli import loftq_run, wants_loftq
from petkit.core.capabilities import set_rank
from petkit.core.disk import folder_bytes, format_bytes
from petkit.core.model import attach, summary
from petkit.core.registry import list_methods, suggested_lr
from petkit.core.state import active_adapters
from petkit.data import is_data_file
from petkit.data.embedded import DATASETS
from petkit.models.embedded import MODELS
from petkit.models.packages import extra_packages, installed_version, require_module
from petkit.training.evaluate import format_metrics

hf_logging.disable_progress_bar()  # "Loading weights" bars would bury petkit's own output


def _recipe(args: argparse.Namespace, dotted: dict[str, str], base: Any = None) -> Any:
    """Recipe from --recipe (or `base`, or the default), then named flags, then dotted ones.
    With --resume: the run folder's own recipe, changed only where --resume-override says."""
    dotted = {**section_values(args), **dotted}  # the declared --section.field flags too
    if getattr(args, "resume", False):
        if args.recipe:
            raise UsageError("--resume continues the run in --output with its own recipe.yaml; "
                             "drop --recipe")
        folder = Path(args.output or DEFAULT_OUTPUT)
        saved = folder / "recipe.yaml"
        recipe = load_recipe(saved) if saved.is_file() else load_recipe("default")
        return resume_recipe(folder, _overrides(args, dotted, recipe),
                             _override_fields(args.resume_override))
    if getattr(args, "resume_override", None):
        raise UsageError("--resume-override only applies with --resume")
    recipe = load_recipe(args.recipe) if args.recipe else base or load_recipe("default")
    return apply_overrides(recipe, _overrides(args, dotted, recipe))


def _override_fields(text: str | None) -> list[str]:
    """--resume-override's value as dotted fields: flag names map through FLAGS."""
    if not text:
        return []
    fields = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name == "schedule":
            fields.extend(SCHEDULE_FIELDS)
        elif name.lstrip("-").replace("-", "_") in FLAGS:
            fields.append(FLAGS[name.lstrip("-").replace("-", "_")])
        elif "." in name:
            fields.append(name.lstrip("-").replace("-", "_"))
        else:
            raise UsageError(f"--resume-override: {name!r} is neither a flag name (steps, lr, "
                             f"...) nor a dotted field (train.max_steps)")
    return fields


def _overrides(args: argparse.Namespace, dotted: dict[str, str], recipe: Any) -> dict[str, str]:
    """The recipe fields the flags and dotted options set, as {"section.field": text}."""
    named = {FLAGS[k]: str(v) for k, v in vars(args).items() if k in FLAGS and v is not None}
    if getattr(args, "head", False):
        named["data.task_type"] = "head"
    if getattr(args, "bf16", False):
        named["runtime.precision"] = "bf16"
    if getattr(args, "reward", None):
        named["train.objective.rewards"] = json.dumps(args.reward)
    overrides = {**named, **dotted}
    if "train.epochs" in overrides and "train.max_steps" not in overrides:
        overrides["train.max_steps"] = "none"  # --epochs alone: the recipe's step cap would cut it
    switched = overrides.get("method.name", recipe.method_name) != recipe.method_name
    if switched and "train.lr" not in overrides:  # the new method's own rate, unless one is given
        lr = suggested_lr(overrides["method.name"])
        if lr is not None:
            overrides["train.lr"] = str(lr)
            OUT.print(f"[dim]lr {lr:g}: {overrides['method.name']}'s suggested rate (--lr sets another)[/dim]")
    overrides, note = objective_switch(recipe, overrides)
    if note:
        OUT.print(f"[dim]{escape(note)}[/dim]")
    return overrides


def cmd_train(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Train as the recipe + flags say; print before/after test metrics and the adapter."""
    from petkit.training.distributed import init_from_env, rank, report_lines

    if init_from_env():  # under torchrun: join the job before loading (cuda = this rank's GPU)
        OUT.quiet = rank() != 0
    recipe = _recipe(args, dotted)
    ranks = _eval_ranks(args, recipe)
    recipe = claim_output(recipe, args.overwrite, lambda line: OUT.print(line, markup=False))
    echo = lambda line: OUT.print(f"[dim]{escape(line)}[/dim]")  # noqa: E731
    recipe, hooks = loftq_run(recipe) if wants_loftq(recipe) else (recipe, pruning_hooks(recipe))
    report = run_objective_recipe(recipe, echo, hooks) if is_objective_run(recipe) \
        else run_recipe(recipe, echo=echo, hooks=hooks, command=["petkit", *args.argv])
    result = report.result
    OUT.print(f"test after:  [bold green]{format_metrics(report.after)}[/bold green]")
    best = f", best {result.metric}={result.best_metric:.4f} at step {result.best_step}" \
        if result.best_metric is not None else ""
    noun = "step" if result.steps == 1 else "steps"
    OUT.print(f"{result.steps} {noun} in {result.seconds:.0f}s{best}; "
              f"peak memory {result.peak_memory_mb:.0f} MiB; total {report.seconds:.0f}s")
    OUT.print(f"adapter: {result.adapter_path} ({format_bytes(report.adapter_bytes, 2)} on disk)")
    folder = Path(report.recipe.train.output_dir or DEFAULT_OUTPUT)
    plot = folder / "training.png"
    if plot.is_file():
        OUT.print(f"loss curve: {plot}; log: {plot.parent / 'train.log'}")
    OUT.print(f"results (metrics, command, versions, times): {folder / 'results.json'}")
    if ranks:
        _rank_sweep(report.recipe, result.adapter_path, ranks)
    for line in report_lines(result.report, args.verbose):  # e.g. IST: each layer's updates
        OUT.print(line, markup=False)


def _eval_ranks(args: argparse.Namespace, recipe: Any) -> list[int]:
    """--dylora-eval-ranks, checked against the method before any training."""
    if not getattr(args, "eval_ranks", None):
        return []
    ranks = parse_ranks(args.eval_ranks)
    check_ranks(recipe.method_config(), ranks)
    return ranks


def _rank_sweep(recipe: Any, adapter: Any, ranks: list[int]) -> None:
    """Test accuracy at each rank of the one trained adapter; also written to rank_sweep.json."""
    results = evaluate_at_ranks(recipe, adapter, ranks)
    table = Table("rank", *next(iter(results.values())))
    for rank, metrics in results.items():
        table.add_row(str(rank), *(f"{v:.4f}" for v in metrics.values()))
    OUT.print(table)
    OUT.print(f"rank sweep: {write_sweep(results, Path(adapter).parent / 'rank_sweep.json')}")


def _adapter_recipe(args: argparse.Namespace, dotted: dict[str, str]) -> Any:
    model_given = args.model is not None or "model.name" in dotted
    return _recipe(args, dotted, base=recipe_for_adapter(args.adapter, model_given))


def _eval_data(args: argparse.Namespace, dotted: dict[str, str]) -> dict[str, str]:
    """`eval --data FILE` scores all of FILE (unless --test-size); a task name replaces the task."""
    if not args.eval_data:
        return dotted
    if not is_data_file(args.eval_data):
        return {"data.name": args.eval_data, **dotted}
    sized = {} if args.test_size is not None else {"data.test_size": "none"}
    return {"data.test_file": args.eval_data, **sized, **dotted}


def cmd_eval(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Test metrics of the base model with the adapter loaded."""
    recipe = _adapter_recipe(args, _eval_data(args, dotted))
    if is_objective_run(recipe) and args.eval_rank is None:  # pairs / prompts with references
        scored = evaluate_objective_adapter(recipe, args.adapter, OUT.print)
        if scored is not None:
            OUT.print(f"test on {scored[0]} examples ({objective_of(recipe).name}): "
                      f"{format_metrics(scored[1])}")
            return
    prep = load_with_adapter(recipe, args.adapter)
    if args.eval_rank is not None:
        set_rank(prep.model, args.eval_rank, active_adapters(prep.model)[0])
    for note in prep.notes:
        OUT.print(f"[dim]{escape(note)}[/dim]")
    OUT.print(f"test on {len(prep.test)} examples ({prep.task_type}): "
              f"{format_metrics(test_metrics(prep, recipe))}")


def cmd_merge(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Write the merged model as a plain Hugging Face folder."""
    out = merge_to_folder(_adapter_recipe(args, dotted), args.adapter, args.merged,
                          requantize=args.requantize, overwrite=args.overwrite,
                          echo=lambda line: OUT.print(line, markup=False))
    OUT.print(f"merged model: {out} ({format_bytes(folder_bytes(out))}; "
              f"loads with transformers' from_pretrained, no petkit needed; how: {out / 'README.md'})")


def cmd_export(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Write the adapter as a PEFT folder, or one vLLM's LoRA loader accepts."""
    adapter_cli.export(args, _adapter_recipe(args, dotted), lambda line: OUT.print(line, markup=False))


def cmd_predict(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Predictions of the adapter for every row of a file."""
    adapter_cli.predict(args, _adapter_recipe(args, dotted), lambda line: OUT.print(line, markup=False))


def cmd_inspect(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """pk.summary of the model with the adapter loaded or the method attached."""
    if args.adapter and args.method:
        raise UsageError("inspect takes --adapter or --method, not both")
    recipe = _adapter_recipe(args, dotted) if args.adapter else _recipe(args, dotted)
    prep = load_with_adapter(recipe, args.adapter, with_data=needs_data(recipe))
    if not args.adapter:
        attach(prep.model, method_config(recipe, prep))
    OUT.print(summary(prep.model), markup=False)


def cmd_methods(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Table of registered methods."""
    table = Table("method", "family", "paper")
    for name, family, paper in sorted(list_methods()):
        table.add_row(name, family, paper)
    OUT.print(table)


def cmd_embedded(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Table of the registered embedded tasks and models and the packages they read; `petkit
    train`'s default task and model first, marked."""
    from petkit.app.recipe import DataSpec, ModelSpec

    table = Table("name", "kind", "package", "what")
    defaults = {DataSpec().name, ModelSpec().name}
    entries = [*DATASETS.values(), *MODELS.values()]
    for entry in sorted(entries, key=lambda e: e.name not in defaults):  # stable: the rest as registered
        package, state = entry.package, ""
        if package is not None:
            found = installed_version(package)
            state = ("" if found == package.version else f" ({found} installed)"
                     if found != "unknown" else f" (missing: {package.pip_command})")
        pin = f"{package.dist}=={package.version}{state}" if package else "built in"
        name = f"{entry.name} (default)" if entry.name in defaults else entry.name
        table.add_row(name, entry.kind, pin, entry.description)
    OUT.print(table)


def cmd_bench(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Run or resume a benchmark grid; print where the results are."""
    OUT.print(bench_cli.command(args, dotted))


def cmd_quantize(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Quantise a causal LM to int4/3/2 (EfficientQAT Block-AP or RTN) and save it for transformers."""
    from petkit import cli_quantize

    cli_quantize.run(args, lambda line: OUT.print(line, markup=False))


def cmd_continual(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Learn tasks in order; print the accuracy matrix, forgetting and where the files are."""
    from petkit.continual import cli as continual_cli

    for line in continual_cli.command(args, dotted, lambda line: OUT.print(line, markup=False)):
        OUT.print(line, markup=False)


def cmd_fed(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Federated rounds on Flower; prints each round, the partition, bytes vs full-model FedAvg."""
    require_module("flwr", extra_packages("fed"), "petkit fed")
    from petkit.fed import cli as fed_cli  # here, not at the top: it imports Flower

    fed_cli.run_command(args, dotted, lambda line: OUT.print(line, markup=False))


def cmd_replay(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Rebuild the adapter of a zeroth-order run from its log."""
    out = replay_run(args.log, args.replayed, args.replay_steps, overwrite=args.overwrite)
    OUT.print(f"adapter: {out} ({format_bytes(folder_bytes(out), 2)}) rebuilt from "
              f"{args.log} ({os.path.getsize(args.log) / 1024:.1f} KiB)")


def cmd_serve(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Serve the base and its adapters over HTTP until interrupted."""
    from petkit.serve import serve_cli

    serve_cli.command(args, lambda line: OUT.print(line, markup=False), dotted)


def cmd_talk(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """`petkit generate` / `petkit chat`: answers of a base and its adapters, streamed."""
    from petkit.serve import cli as talk_cli

    talk_cli.command(args, dotted, chat=args.command == "chat")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export,
            "predict": cmd_predict, "inspect": cmd_inspect,
            "methods": cmd_methods, "embedded": cmd_embedded, "replay": cmd_replay, "fed": cmd_fed, "bench": cmd_bench,
            "continual": cmd_continual, "quantize": cmd_quantize,
            "serve": cmd_serve, "generate": cmd_talk, "chat": cmd_talk}
