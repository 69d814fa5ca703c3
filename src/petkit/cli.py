"""`petkit` command line: parse, call the library, print. Every user mistake is one red line and
exit code 2; no traceback.

    petkit train                         # LoRA on smollm2-135m for rotten-tomatoes, on the CPU
    petkit train --recipe minilm-bbc --steps 50 --method.r=16 --train.lr=1e-3
    petkit train --prune loraprune --sparsity 0.5   # prune heads + MLP channels while tuning
    petkit train --data tweets.csv --test-file test.csv --text-column tweet --label-column mood
    petkit eval --adapter runs/default/adapter --data test.csv   # scores every row of test.csv
    petkit merge --adapter runs/default/adapter --output merged/
    petkit export --adapter runs/default/adapter --format vllm --output served/   # or peft
    petkit predict --adapter runs/default/adapter --data new.csv --output preds.csv
    petkit inspect --method lora         # table: where each delta sits, trainable counts
    petkit methods
    petkit quantize --method efficientqat --bits int4 --output q4/   # Block-AP, transformers loads q4/
    petkit embedded                      # the offline tasks and models, each with its pip package
    petkit fed --clients 10 --alpha 0.5   # federated LoRA on Flower, only the delta travels
    petkit bench grid.yaml --output runs/bench   # methods x tasks x seeds x sizes, resumable
    petkit continual --tasks bbc-classes --strategy hide   # tasks in sequence, forgetting
    petkit chat --adapter runs/default/adapter --compare   # talk to an adapter (and its base)
    petkit serve --adapter support=runs/default/adapter   # OpenAI-compatible API + playground
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich.markup import escape

from petkit import cli_adapter as adapter_cli  # flags only: export / predict load when they run
from petkit.benchmark import cli as bench_cli  # flags only: the grid runs in its command
from petkit import cli_quantize as qat_cli  # flags only: torch loads when `petkit quantize` runs
from petkit.cli_flags import (COLUMNS, DATA, DOTTED, FLAGS, HELP, METAVARS, METHOD, OBJECTIVE,
                              OPTIMISERS, REWARD_HELP, TRAINING, speak_flags)
from petkit.cli_io import ERR, UsageError
from petkit.cli_sections import (add_section_flags, check_applies, sections_of,
                                 values as section_values)
from petkit.core.errors import PetkitError
from petkit.continual import cli as continual_cli  # flags only, as for bench and fed
from petkit.fed import flags as fed_flags  # flags only: `petkit fed` imports Flower when it runs
from petkit.serve import cli as talk_cli  # flags only: the model loads when a command runs
from petkit.serve import serve_cli  # flags only: FastAPI and uvicorn load when `petkit serve` runs


class _Parser(argparse.ArgumentParser):
    """Errors are usage errors; a subcommand's section flags are added when it parses or shows
    its help (not when `petkit --help` builds every subcommand)."""

    section_command: str | None = None

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def add_sections(self) -> _Parser:
        """Add the `--section.field` flags of this subcommand (once)."""
        if self.section_command is not None:
            command, self.section_command = self.section_command, None
            if self.usage is None and sections_of(command):  # not a hundred flags in usage
                usage = super().format_usage().removeprefix("usage: ").rstrip()
                self.usage = f"{usage} [--SECTION.FIELD VALUE ...]"
            add_section_flags(self, command)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.add_sections()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.add_sections()
        return super().format_help()


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
    train.add_argument("--resume-override", nargs="?", const="schedule", default=None,
                       metavar="FIELDS",
                       help="with --resume: let these options change, comma-separated flag "
                            "names or dotted fields (steps,lr or train.max_steps); alone: the "
                            "schedule (steps, epochs, lr, warm-up, batch, accumulation). The run "
                            "is then no longer an exact continuation")
    train.add_argument("--verbose", action="store_true",
                       help="with --nproc: torchrun's own output and the bytes the processes exchanged")
    train.add_argument("--nproc", type=int, default=None,
                       help="train on N local processes through torchrun (DDP or FSDP2: runtime.distributed; docs/distributed.md)")
    train.add_argument("--dylora-eval-ranks", dest="eval_ranks", default=None,
                       help="after training, test the adapter at each rank, e.g. 1,2,4,8 (dylora)")
    evaluate = sub.add_parser("eval", help="test metrics of a saved adapter", epilog=DOTTED)
    evaluate.add_argument("--adapter", required=True, help="adapter folder")
    evaluate.add_argument("--data", dest="eval_data", metavar="FILE",
                          help="file to score, all its rows unless --test-size (or a task name); "
                               "default: the run's own test set")
    evaluate.add_argument("--rank", dest="eval_rank", type=int, default=None,
                          help="evaluate at this rank (methods trained over a range of ranks: dylora)")
    _add_flags(evaluate, ("model", *COLUMNS, "max_length", "test_size", "task_type", "format",
                          "data_split", "data_config", "chat_template", "train_on", "bad_rows"))
    merge = sub.add_parser("merge", help="merge an adapter into a plain Hugging Face model folder")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--output", dest="merged", required=True, help="folder to write")
    merge.add_argument("--requantize", action="store_true",
                       help="adapter trained on a quantised base: merge into its 4/8-bit weights and "
                            "report the error that adds (default: into the dequantised base, exact)")
    merge.add_argument("--overwrite", action="store_true", help="replace a folder that holds "
                       "files (by default refused; the old one goes only once the new is complete)")
    _add_flags(merge, ("model", "data", "task_type"))
    commands = adapter_cli.add_parsers(sub)
    _add_flags(commands["export"], ("model",))
    _add_flags(commands["predict"], ("model", "max_length"))
    inspect = sub.add_parser("inspect", help="table of where each delta sits, with trainable "
                                             "counts")
    inspect.add_argument("--adapter", help="adapter folder to load")
    _add_flags(inspect, ("model", "method", "data", "task_type"))
    qat_cli.add_arguments(sub.add_parser("quantize", help="int4/int3/int2 quantisation (EfficientQAT "
                                         "Block-AP or RTN) saved for transformers (docs/compressed.md)"))
    sub.add_parser("methods", help="registered methods, family and paper")
    sub.add_parser("embedded", help="embedded tasks and models: what each is, its pinned package")
    replay = sub.add_parser("replay", help="rebuild a zeroth-order run's adapter from its "
                                           "(seed, gradient) log")
    replay.add_argument("--log", required=True, help="zo_log.jsonl of a run with train.zo_log=true")
    replay.add_argument("--output", dest="replayed", required=True, help="adapter folder to write")
    replay.add_argument("--steps", dest="replay_steps", type=int, default=None,
                        help="replay only the first N steps (e.g. the run's best step)")
    replay.add_argument("--overwrite", action="store_true",
                        help="replace the adapter already in --output")
    fed_flags.add_arguments(sub.add_parser("fed", help="federated tuning on Flower (simulation, or "
                                         "--deploy to a SuperLink): only the delta travels"))
    bench_cli.add_arguments(sub.add_parser("bench", help="fair benchmark grid from a YAML file: "
                                           "methods x tasks x seeds x sizes (resumable)"))
    continual_cli.add_arguments(sub.add_parser("continual", help="tasks in sequence: accuracy "
                                               "matrix, forgetting (o-lora, inflora, hide, ...)"))
    talk_cli.add_arguments(sub.add_parser("generate", help="answer prompts with a base and its adapters, "
                                          "streamed (--compare: side by side)"), chat=False)
    talk_cli.add_arguments(sub.add_parser("chat", help="chat with an adapter in the terminal (stdin "
                                          "lines; /reset, /exit)"), chat=True)
    serve_cli.add_arguments(sub.add_parser("serve", help="OpenAI-compatible server of a base and "
                                           "many adapters, with a playground page (docs/serving.md)"))
    for name, command in sub.choices.items():
        command.section_command = name
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


def _relaunch(nproc: int, argv: list[str], verbose: bool) -> int:
    """`petkit train --nproc N ...`: the same command on N processes through torchrun."""
    from petkit.training.distributed import launch

    code = launch(nproc, argv, verbose)
    if code:
        ERR.print(f"[bold red]error:[/bold red] the {nproc}-process run failed (torchrun exit "
                  f"code {code}); the failing rank and its error are printed above")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `petkit` console script; returns the exit code. The commands (and torch
    with them) are imported only once the arguments parse."""
    try:
        args, extra = build_parser().parse_known_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]
        if getattr(args, "nproc", None) and "WORLD_SIZE" not in os.environ:
            return _relaunch(args.nproc, list(argv) if argv is not None else sys.argv[1:],
                             args.verbose)
        dotted = {**section_values(args), **_split_dotted(extra)}
        check_applies(args.command, dotted)
        from petkit.cli_commands import COMMANDS

        COMMANDS[args.command](args, dotted)
    except PetkitError as err:
        ERR.print(f"[bold red]error:[/bold red] {escape(speak_flags(' '.join(str(err).split())))}")
        return 2
    except KeyboardInterrupt:
        ERR.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())


def __getattr__(name: str) -> Any:
    """The commands' helpers (`_recipe`, `cmd_train`, `COMMANDS`, ...) under their old home."""
    if not name.startswith("__") and (name.startswith(("_", "cmd_")) or name == "COMMANDS"):
        import petkit.cli_commands as commands

        if hasattr(commands, name):
            return getattr(commands, name)
    raise AttributeError(f"module 'petkit.cli' has no attribute {name!r}")
