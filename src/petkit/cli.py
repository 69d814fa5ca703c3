"""`petkit` command line: parse, call the library, print. Every user mistake is one red line and
exit code 2; no traceback.

    petkit train                         # LoRA on smollm2-135m for rotten-tomatoes, on the CPU
    petkit train --recipe minilm-bbc --steps 50 --method.r=16 --train.lr=1e-3
    petkit eval --adapter runs/default/adapter
    petkit merge --adapter runs/default/adapter --output merged/
    petkit inspect --method lora         # model tree, where each delta sits, trainable counts
    petkit methods
    petkit fed --clients 10 --alpha 0.5   # federated LoRA on Flower, only the delta travels
    petkit bench grid.yaml --output runs/bench   # methods x tasks x seeds x sizes, resumable
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from petkit.core.errors import PetkitError
from petkit.core.capabilities import set_rank
from petkit.core.model import attach, summary
from petkit.core.registry import list_methods
from petkit.core.state import active_adapters

ERR = Console(stderr=True, highlight=False, soft_wrap=True)
OUT = Console(highlight=False, soft_wrap=True)

# Named flags and the recipe field each one sets; any other field is reachable as --section.field.
FLAGS = {"method": "method.name", "model": "model.name", "data": "data.name",
         "task_type": "data.task_type", "steps": "train.max_steps", "lr": "train.lr",
         "batch_size": "train.batch_size", "max_length": "data.max_length",
         "train_size": "data.train_size", "test_size": "data.test_size", "seed": "train.seed",
         "output": "train.output_dir", "ist_top_k": "train.ist.top_k",
         "ist_every": "train.ist.every", "optimizer": "train.optimizer", "eps": "train.stepper.eps",
         "n_spsa": "train.stepper.n_spsa", "dim": "train.stepper.dim",
         "popsize": "train.stepper.popsize"}
COMMON = ("model", "data", "max_length", "test_size", "task_type")


class UsageError(PetkitError):
    """A command-line mistake (unknown flag, missing value)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    helps = {"steps": "optimiser steps", "output": "output folder (adapter, logs, checkpoints)",
             "task_type": "auto | verbaliser | head | instruction",
             "method": "registered method name (see `petkit methods`)",
             "ist_top_k": "IST: update only this many importance-sampled layers per step",
             "ist_every": "IST: re-score layer importance every this many steps (default 10)",
             "optimizer": "adamw | sgd (backprop), mezo | zo-adam (zeroth-order), cma (CMA-ES)",
             "eps": "zeroth-order perturbation scale (train.stepper.eps)",
             "n_spsa": "zeroth-order perturbations per step (train.stepper.n_spsa)",
             "dim": "CMA-ES subspace dimension d (train.stepper.dim)",
             "popsize": "CMA-ES population size (train.stepper.popsize)"}
    for name in names:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None,
                            help=helps.get(name, f"sets {FLAGS[name]}"))
    parser.add_argument("--recipe", help="YAML recipe file or shipped recipe name")


def build_parser() -> argparse.ArgumentParser:
    """The `petkit` parser; dotted `--section.field=value` overrides are taken on top."""
    parser = _Parser(prog="petkit", description="Parameter-efficient tuning of transformers.",
                     epilog="Any recipe field can be set as --method.r=16, --train.lr=1e-4, ...")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a delta (default: LoRA, smollm2-135m, "
                                         "rotten-tomatoes, CPU, a few minutes)")
    _add_flags(train, list(FLAGS))
    train.add_argument("--head", action="store_true", help="train a classification head "
                                                             "instead of the verbaliser")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--nproc", type=int, default=None,
                       help="train on N local processes through torchrun (DDP or FSDP2: train.distributed; docs/distributed.md)")
    train.add_argument("--dylora-eval-ranks", dest="eval_ranks", default=None,
                       help="after training, test the adapter at each rank, e.g. 1,2,4,8 (dylora)")
    evaluate = sub.add_parser("eval", help="test metrics of a saved adapter")
    evaluate.add_argument("--adapter", required=True, help="adapter folder")
    evaluate.add_argument("--rank", type=int, default=None,
                          help="evaluate at this rank (methods trained over a range of ranks: dylora)")
    _add_flags(evaluate, COMMON)
    merge = sub.add_parser("merge", help="merge an adapter into a plain Hugging Face model folder")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--output", dest="merged", required=True, help="folder to write")
    _add_flags(merge, ("model", "data", "task_type"))
    inspect = sub.add_parser("inspect", help="model tree with each delta and trainable counts")
    inspect.add_argument("--adapter", help="adapter folder to load")
    _add_flags(inspect, ("model", "method", "data", "task_type"))
    sub.add_parser("methods", help="registered methods, family and paper")
    replay = sub.add_parser("replay", help="rebuild a zeroth-order run's adapter from its "
                                           "(seed, gradient) log")
    replay.add_argument("--log", required=True, help="zo_log.jsonl of a run with train.zo_log=true")
    replay.add_argument("--output", dest="replayed", required=True, help="adapter folder to write")
    replay.add_argument("--steps", dest="replay_steps", type=int, default=None,
                        help="replay only the first N steps (e.g. the run's best step)")
    from petkit.fed import cli as fed_cli

    fed_cli.add_arguments(sub.add_parser("fed", help="federated tuning on Flower (simulation, or "
                                         "--deploy to a SuperLink): only the delta travels"))
    from petkit.benchmark import cli as bench_cli

    bench_cli.add_arguments(sub.add_parser("bench", help="fair benchmark grid from a YAML file: "
                                           "methods x tasks x seeds x sizes (resumable)"))
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
    from petkit.core.registry import suggested_lr
    from petkit.app.recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else base or load_recipe("default")
    named = {FLAGS[k]: str(v) for k, v in vars(args).items() if k in FLAGS and v is not None}
    if getattr(args, "head", False):
        named["data.task_type"] = "head"
    if getattr(args, "resume", False):
        named["train.resume"] = "true"
    overrides = {**named, **dotted}
    switched = overrides.get("method.name", recipe.method_name) != recipe.method_name
    if switched and "train.lr" not in overrides:  # the new method's own rate, unless one is given
        lr = suggested_lr(overrides["method.name"])
        if lr is not None:
            overrides["train.lr"] = str(lr)
            OUT.print(f"[dim]lr {lr:g}: {overrides['method.name']}'s suggested rate (--lr sets another)[/dim]")
    return apply_overrides(recipe, overrides)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def cmd_train(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Train as the recipe + flags say; print before/after test metrics and the adapter."""
    from petkit.app.pipeline import run_recipe
    from petkit.training.distributed import init_from_env, rank

    if init_from_env():  # under torchrun: join the job before loading (cuda = this rank's GPU)
        OUT.quiet = rank() != 0
    recipe = _recipe(args, dotted)
    ranks = _eval_ranks(args, recipe)
    report = run_recipe(recipe, echo=lambda line: OUT.print(f"[dim]{line}[/dim]"))
    result = report.result
    OUT.print(f"test before: {_fmt(report.before)}")
    OUT.print(f"test after:  [bold green]{_fmt(report.after)}[/bold green]")
    best = f", best {result.metric}={result.best_metric:.4f} at step {result.best_step}" \
        if result.best_metric is not None else ""
    OUT.print(f"{result.steps} steps in {result.seconds:.0f}s{best}; "
              f"peak memory {result.peak_memory_mb:.0f} MiB; total {report.seconds:.0f}s")
    OUT.print(f"adapter: {result.adapter_path} ({report.adapter_bytes / 2**20:.2f} MiB on disk)")
    if ranks:
        _rank_sweep(report.recipe, result.adapter_path, ranks)
    for key, value in result.report.items():  # e.g. IST: steps each layer was updated in
        OUT.print(f"{key}: {value}", markup=False)


def _eval_ranks(args: argparse.Namespace, recipe: Any) -> list[int]:
    """--dylora-eval-ranks, checked against the method before any training."""
    from petkit.app.rank_sweep import check_ranks, parse_ranks

    if not getattr(args, "eval_ranks", None):
        return []
    ranks = parse_ranks(args.eval_ranks)
    check_ranks(recipe.method_config(), ranks)
    return ranks


def _rank_sweep(recipe: Any, adapter: Any, ranks: list[int]) -> None:
    """Test accuracy at each rank of the one trained adapter; also written to rank_sweep.json."""
    from pathlib import Path

    from petkit.app.rank_sweep import evaluate_at_ranks, write_sweep

    results = evaluate_at_ranks(recipe, adapter, ranks)
    table = Table("rank", *next(iter(results.values())))
    for rank, metrics in results.items():
        table.add_row(str(rank), *(f"{v:.4f}" for v in metrics.values()))
    OUT.print(table)
    OUT.print(f"rank sweep: {write_sweep(results, Path(adapter).parent / 'rank_sweep.json')}")


def _adapter_recipe(args: argparse.Namespace, dotted: dict[str, str]) -> Any:
    from petkit.app.pipeline import recipe_for_adapter

    return _recipe(args, dotted, base=recipe_for_adapter(args.adapter))


def cmd_eval(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Test metrics of the base model with the adapter loaded."""
    from petkit.app.pipeline import load_with_adapter, test_metrics

    recipe = _adapter_recipe(args, dotted)
    prep = load_with_adapter(recipe, args.adapter)
    if args.rank is not None:
        set_rank(prep.model, args.rank, active_adapters(prep.model)[0])
    OUT.print(f"{recipe.data.name} test ({len(prep.test)} examples, {prep.task_type}): "
              f"{_fmt(test_metrics(prep, recipe))}")


def cmd_merge(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Write the merged model as a plain Hugging Face folder."""
    from petkit.app.pipeline import folder_bytes, merge_to_folder

    out = merge_to_folder(_adapter_recipe(args, dotted), args.adapter, args.merged)
    OUT.print(f"merged model: {out} ({folder_bytes(out) / 2**20:.1f} MiB; "
              "loads with transformers' from_pretrained, no petkit needed)")


def cmd_inspect(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """pk.summary of the model with the adapter loaded or the method attached."""
    from petkit.app.pipeline import load_with_adapter, method_config

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
    for name, family, paper in list_methods():
        table.add_row(name, family, paper)
    OUT.print(table)


def cmd_bench(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Run or resume a benchmark grid; print where the results are."""
    from petkit.benchmark import cli as bench_cli

    OUT.print(bench_cli.command(args, dotted))


def cmd_fed(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Federated rounds on Flower; prints each round, the partition, bytes vs full-model FedAvg."""
    from petkit.fed import cli as fed_cli

    fed_cli.run_command(args, dotted, lambda line: OUT.print(line, markup=False))


def cmd_replay(args: argparse.Namespace, dotted: dict[str, str]) -> None:
    """Rebuild the adapter of a zeroth-order run from its log."""
    from petkit.app.pipeline import folder_bytes
    from petkit.app.replay import replay_run

    out = replay_run(args.log, args.replayed, args.replay_steps)
    OUT.print(f"adapter: {out} ({folder_bytes(out) / 2**20:.2f} MiB) rebuilt from "
              f"{args.log} ({os.path.getsize(args.log) / 1024:.1f} KiB)")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "inspect": cmd_inspect,
            "methods": cmd_methods, "replay": cmd_replay, "fed": cmd_fed, "bench": cmd_bench}


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
