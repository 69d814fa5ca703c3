"""The `petkit export` and `petkit predict` subcommands: their arguments and what they print
(the library work is in `petkit.app.export` and `petkit.app.predict`)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from petkit.core.disk import folder_bytes, format_bytes

FORMATS = ("peft", "vllm")  # petkit.app.export.FORMATS, named here so --help imports no torch

Echo = Callable[[str], None]


def add_parsers(sub: Any) -> dict[str, argparse.ArgumentParser]:
    """Add `export` and `predict` to the subcommand table; returns them by name (the caller adds
    the recipe flags they share with the other adapter commands)."""
    export = sub.add_parser("export", help="write an adapter for other tools: PEFT, or vLLM's "
                                           "LoRA loader (checked against its rules)")
    export.add_argument("--adapter", required=True, help="adapter folder")
    export.add_argument("--format", dest="export_format", default="peft", choices=FORMATS,
                        help="peft (Hugging Face PEFT) | vllm (PEFT that vLLM serves)")
    export.add_argument("--output", dest="exported", required=True, help="folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace a folder that holds files")
    predict = sub.add_parser("predict", help="predictions (and scores) of an adapter for the "
                                             "rows of a file without labels")
    predict.add_argument("--adapter", required=True, help="adapter folder")
    predict.add_argument("--data", dest="predict_data", required=True, metavar="FILE",
                         help=".csv .jsonl .json .parquet with the column the run read")
    predict.add_argument("--output", dest="predictions", required=True, metavar="FILE",
                         help="predictions file to write (.csv or .jsonl): input columns + "
                              "prediction and score_<label> (completion for instruction runs)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing file")
    predict.add_argument("--batch-size", dest="predict_batch", type=int, default=16)
    predict.add_argument("--max-new-tokens", type=int, default=64,
                         help="instruction runs: tokens generated per row (greedy)")
    predict.add_argument("--text-column", "--prompt-column", dest="input_column", metavar="NAME",
                         help="FILE's column to read (default: the one the run read)")
    return {"export": export, "predict": predict}


def export(args: argparse.Namespace, recipe: Any, echo: Echo) -> None:
    """`petkit export`: write the folder; say where, for which base, and how vLLM serves it."""
    from petkit.app.export import export_adapter
    out, card = export_adapter(recipe, args.adapter, args.exported, args.export_format,
                               overwrite=args.overwrite)
    echo(f"{args.export_format} adapter: {out} ({format_bytes(folder_bytes(out), 2)}) for base "
         f"{card['base']}; how to use it: {out / 'README.md'}")
    if card["max_lora_rank"]:
        echo(f"vllm serve {card['base']} --enable-lora --max-lora-rank {card['max_lora_rank']} "
             f"--lora-modules adapter={out.resolve()}")


def predict(args: argparse.Namespace, recipe: Any, echo: Echo) -> None:
    """`petkit predict`: write the predictions; say how many and what was predicted."""
    from petkit.app.predict import predict_file

    done = predict_file(recipe, args.adapter, args.predict_data, args.predictions,
                        batch_size=args.predict_batch, max_new_tokens=args.max_new_tokens,
                        overwrite=args.overwrite, column=args.input_column)
    counts = ", ".join(f"{k} {v}" for k, v in done.counts.items())
    echo(f"{done.rows} predictions ({done.task_type}{': ' + counts if counts else ''}): {done.path}")
