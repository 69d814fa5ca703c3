"""`petkit` command line: parse, call the library, print. Every user mistake is one red line and
exit code 2; no traceback.

    petkit train                         # LoRA on smollm2-135m for rotten-tomatoes, on the CPU
    petkit train --recipe minilm-bbc --steps 50 --method.r=16 --train.lr=1e-3
    petkit train --prune loraprune --sparsity 0.5   # prune heads + MLP channels while tuning
    petkit train --data tweets.csv --test-file test.csv --text-column tweet --label-column mood
    petkit eval --adapter runs/default/adapter --data test.csv   # scores every row of test.csv
    petkit merge --adapter runs/default/adapter --output merged/
    petkit inspect --method lora         # table: where each delta sits, trainable counts
    petkit methods
    petkit fed --clients 10 --alpha 0.5   # federated LoRA on Flower, only the delta travels
    petkit bench grid.yaml --output runs/bench   # methods x tasks x seeds x sizes, resumable
    petkit continual --tasks bbc-classes --strategy hide   # tasks in sequence, forgetting
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from petkit.app.objective_run import is_objective_run, run_objective_recipe
from petkit.app.pipeline import (load_with_adapter, merge_to_folder, method_config, recipe_for_adapter,
                                 run_recipe, test_metrics)
from petkit.app.rank_sweep import check_ranks, evaluate_at_ranks, parse_ranks, write_sweep
from petkit.app.recipe import apply_overrides, load_recipe
from petkit.app.replay import replay_run
from petkit.app.run_folder import DEFAULT_OUTPUT, claim_output
from petkit.benchmark import cli as bench_cli
from petkit.cli_flags import (COLUMNS, DATA, DOTTED, FLAGS, HELP, METAVARS, METHOD, OBJECTIVE,
                              OPTIMISERS, REWARD_HELP, TRAINING)
from petkit.compress.cli import pruning_hooks
from petkit.core.disk import folder_bytes, format_bytes
from petkit.core.errors import PetkitError
from petkit.core.capabilities import set_rank
from petkit.core.model import attach, summary
from petkit.core.registry import list_methods, suggested_lr
from petkit.core.state import active_adapters
from petkit.data import is_data_file
from petkit.fed import flags as fed_flags  # flags only: `petkit fed` imports Flower when it runs
from petkit.models.packages import require_module
from petkit.training.evaluate import format_metrics

ERR = Console(stderr=True, highlight=False, soft_wrap=True)
OUT = Console(highlight=False, soft_wrap=True)

class UsageError(PetkitError):
    """A command-line mistake (unknown flag, missing value)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_flags(parser: argparse.ArgumentParser, names: Sequence[str], title: str | None = None,
               recipe: bool = True) -> None:
    group = parser.add_argument_group(title) if title else parser
    for name in names:
        flags = ["--" + name.replace("_", "-")] + (["--train-file"] if name == "data" else [])
        group.add_argument(*flags, dest=name, default=None,
                           metavar=METAVARS.get(name, name.split("_")[-1].upper()),
                           help=HELP.get(name, f"sets {FLAGS[name]}"))
    if recipe:
        parser.add_argument("--recipe", help="YAML recipe file or shipped recipe name")


def build_parser() -> argparse.ArgumentParser:
    """The `petkit` parser; dotted `--section.field=value` overrides are taken on top."""
    parser = _Parser(prog="petkit", description="Parameter-efficient tuning of transformers.",
                     epilog="Any recipe field can be set as --method.r=16, --train.lr=1e-4, ... "
                            "(see petkit train --help)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a delta (default: LoRA, smollm2-135m, "
                                         "rotten-tomatoes, CPU, a few minutes)", epilog=DOTTED)
    _add_flags(train, DATA, "data")
    _add_flags(train, TRAINING, "training", recipe=False)
    _add_flags(train, METHOD, "method and model", recipe=False)
    _add_flags(train, OPTIMISERS, "other optimisers", recipe=False)
    _add_flags(train, OBJECTIVE, "objectives (docs/objectives.md)", recipe=False)
    train.add_argument("--reward", action="append", default=None, metavar="MODULE:FUNCTION",
                       help=REWARD_HELP)
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (--precision bf16)")
    train.add_argument("--head", action="store_true", help="train a classification head "
                                                             "instead of the verbaliser")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output (by default a named folder "
                            "holding a run is refused, and the default folder moves on to "
                            "runs/default-N)")
    train.add_argument("--resume-override", action="store_true",
                       help="with --resume: accept changed max steps, lr, schedule, batch or "
                            "accumulation (the run is then no longer an exact continuation)")
    train.add_argument("--nproc", type=int, default=None,
                       help="train on N local processes through torchrun (DDP or FSDP2: train.distributed; docs/distributed.md)")
    train.add_argument("--dylora-eval-ranks", dest="eval_ranks", default=None,
                       help="after training, test the adapter at each rank, e.g. 1,2,4,8 (dylora)")
    evaluate = sub.add_parser("eval", help="test metrics of a saved adapter", epilog=DOTTED)
    evaluate.add_argument("--adapter", required=True, help="adapter folder")
    evaluate.add_argument("--data", dest="eval_data", metavar="FILE",
                          help="file to score, all its rows unless --test-size (or a task name); "
                               "default: the run's own test set")
    evaluate.add_argument("--rank", dest="eval_rank", type=int, default=None,
                          help="evaluate at this rank (methods trained over a range of ranks: dylora)")
    _add_flags(evaluate, ("model", *COLUMNS, "max_length", "test_size", "task_type"))
    merge = sub.add_parser("merge", help="merge an adapter into a plain Hugging Face model folder")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--output", dest="merged", required=True, help="folder to write")
    merge.add_argument("--requantize", action="store_true",
                       help="adapter trained on a quantised base: merge into its 4/8-bit weights and "
                            "report the error that adds (default: into the dequantised base, exact)")
    _add_flags(merge, ("model", "data", "task_type"))
    inspect = sub.add_parser("inspect", help="table of where each delta sits, with trainable "
                                             "counts")
    inspect.add_argument("--adapter", help="adapter folder to load")
    _add_flags(inspect, ("model", "method", "data", "task_type"))
    sub.add_parser("methods", help="registered methods, family and paper")
    replay = sub.add_parser("replay", help="rebuild a zeroth-order run's adapter from its "
                                           "(seed, gradient) log")
    replay.add_argument("--log", required=True, help="zo_log.jsonl of a run with train.zo_log=true")
    replay.add_argument("--output", dest="replayed", required=True, help="adapter folder to write")
    replay.add_argument("--steps", dest="replay_steps", type=int, default=None,
                        help="replay only the first N steps (e.g. the run's best step)")
    fed_flags.add_arguments(sub.add_parser("fed", help="federated tuning on Flower (simulation, or "
                                         "--deploy to a SuperLink): only the delta travels"))
    bench_cli.add_arguments(sub.add_parser("bench", help="fair benchmark grid from a YAML file: "
                                           "methods x tasks x seeds x sizes (resumable)"))
    from petkit.continual import cli as continual_cli

    continual_cli.add_arguments(sub.add_parser("continual", help="tasks in sequence: accuracy "
                                               "matrix, forgetting (o-lora, inflora, hide, ...)"))
    return parser


def _split_dotted(extra: Sequence[str]) -> dict[str, str]:
    """`--section.field=value` / `--section.field value` pairs; anything else is an error."""
    out, items = {}, list(extra)
    while items:
        item = items.pop(0)
        key, eq, value = item[2:].partition("=")
        if not item.startswith("--") or "." not in key:
            raise UsageError(f"unrecognised argument {item!r} (see petkit <command> --help)")
        if not eq:
            if not items or items[0].startswith("--"):
                raise UsageError(f"{item} needs a value")
            value = items.pop(0)
        out[key.replace("-", "_")] = value
    return out


def _recipe(args: argparse.Namespace, dotted: dict[str, str], base: Any = None) -> Any:
    """Recipe from --recipe (or `base`, or the default), then named flags, then dotted ones."""
    recipe = load_recipe(args.recipe) if args.recipe else base or load_recipe("default")
    named = {FLAGS[k]: str(v) for k, v in vars(args).items() if k in FLAGS and v is not None}
    if getattr(args, "head", False):
        named["data.task_type"] = "head"
    if getattr(args, "bf16", False):
        named["train.precision"] = "bf16"
    if getattr(args, "resume", False):
        named["train.resume"] = "true"
    if getattr(args, "resume_override", False):
        named["train.resume_override"] = "true"
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
    return apply_overrides(recipe, overrides)


def cmd_train(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Train as the recipe + flags say; print before/after test metrics and the adapter."""
    from petkit.training.distributed import init_from_env, rank

    if init_from_env():  # under torchrun: join the job before loading (cuda = this rank's GPU)
        OUT.quiet = rank() != 0
    recipe = _recipe(args, dotted)
    ranks = _eval_ranks(args, recipe)
    recipe = claim_output(recipe, args.overwrite, lambda line: OUT.print(line, markup=False))
    echo = lambda line: OUT.print(f"[dim]{escape(line)}[/dim]")  # noqa: E731
    hooks = pruning_hooks(recipe)
    report = run_objective_recipe(recipe, echo, hooks) if is_objective_run(recipe) \
        else run_recipe(recipe, echo=echo, hooks=hooks)
    result = report.result
    OUT.print(f"test after:  [bold green]{format_metrics(report.after)}[/bold green]")
    best = f", best {result.metric}={result.best_metric:.4f} at step {result.best_step}" \
        if result.best_metric is not None else ""
    noun = "step" if result.steps == 1 else "steps"
    OUT.print(f"{result.steps} {noun} in {result.seconds:.0f}s{best}; "
              f"peak memory {result.peak_memory_mb:.0f} MiB; total {report.seconds:.0f}s")
    OUT.print(f"adapter: {result.adapter_path} ({format_bytes(report.adapter_bytes, 2)} on disk)")
    plot = Path(report.recipe.train.output_dir or DEFAULT_OUTPUT) / "training.png"
    if plot.is_file():
        OUT.print(f"loss curve: {plot}; log: {plot.parent / 'train.log'}")
    if ranks:
        _rank_sweep(report.recipe, result.adapter_path, ranks)
    for key, value in result.report.items():  # e.g. IST: steps each layer was updated in
        OUT.print(f"{key}: {value}", markup=False)


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
    return _recipe(args, dotted, base=recipe_for_adapter(args.adapter))


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
                          requantize=args.requantize, echo=lambda line: OUT.print(line, markup=False))
    OUT.print(f"merged model: {out} ({format_bytes(folder_bytes(out))}; "
              "loads with transformers' from_pretrained, no petkit needed)")


def cmd_inspect(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """pk.summary of the model with the adapter loaded or the method attached."""
    if args.adapter and args.method:
        raise UsageError("inspect takes --adapter or --method, not both")
    recipe = _adapter_recipe(args, dotted) if args.adapter else _recipe(args, dotted)
    head = recipe.data.task_type == "head"
    prep = load_with_adapter(recipe, args.adapter, with_data=head)
    if not args.adapter:
        attach(prep.model, method_config(recipe, prep))
    OUT.print(summary(prep.model), markup=False)


def cmd_methods(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Table of registered methods."""
    table = Table("method", "family", "paper")
    for name, family, paper in sorted(list_methods()):
        table.add_row(name, family, paper)
    OUT.print(table)


def cmd_bench(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Run or resume a benchmark grid; print where the results are."""
    OUT.print(bench_cli.command(args, dotted))


def cmd_continual(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Learn tasks in order; print the accuracy matrix, forgetting and where the files are."""
    from petkit.continual import cli as continual_cli

    for line in continual_cli.command(args, dotted):
        OUT.print(line, markup=False)


def cmd_fed(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Federated rounds on Flower; prints each round, the partition, bytes vs full-model FedAvg."""
    require_module("flwr", "'petkit[fed]'", "petkit fed")
    from petkit.fed import cli as fed_cli  # here, not at the top: it imports Flower

    fed_cli.run_command(args, dotted, lambda line: OUT.print(line, markup=False))


def cmd_replay(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Rebuild the adapter of a zeroth-order run from its log."""
    out = replay_run(args.log, args.replayed, args.replay_steps)
    OUT.print(f"adapter: {out} ({format_bytes(folder_bytes(out), 2)}) rebuilt from "
              f"{args.log} ({os.path.getsize(args.log) / 1024:.1f} KiB)")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "inspect": cmd_inspect,
            "methods": cmd_methods, "replay": cmd_replay, "fed": cmd_fed, "bench": cmd_bench,
            "continual": cmd_continual}


def _relaunch(nproc: int, argv: list[str]) -> int:
    """`petkit train --nproc N ...`: the same command on N processes through torchrun."""
    from petkit.training.distributed import launch

    code = launch(nproc, argv)
    if code:
        ERR.print(f"[bold red]error:[/bold red] the {nproc}-process run failed (torchrun exit "
                  f"code {code}); the failing rank and its error are printed above")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `petkit` console script; returns the exit code."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury petkit's own output
    try:
        args, extra = build_parser().parse_known_args(argv)
        if getattr(args, "nproc", None) and "WORLD_SIZE" not in os.environ:
            return _relaunch(args.nproc, list(argv) if argv is not None else sys.argv[1:])
        COMMANDS[args.command](args, _split_dotted(extra))
    except PetkitError as err:
        ERR.print(f"[bold red]error:[/bold red] {escape(str(err).splitlines()[0])}")
        return 2
    except KeyboardInterrupt:
        ERR.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
