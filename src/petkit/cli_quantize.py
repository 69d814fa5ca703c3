"""`petkit quantize`: integer int4/int3/int2 quantisation of a causal LM, saved for transformers.

    petkit quantize --method efficientqat --bits int4 --group-size 128 --output q4/   # Block-AP + E2E-QP
    petkit quantize --method rtn --bits int3 --output q3-rtn/                         # baseline
    petkit train --model q4/ --method peqa            # E2E-QP: only the step sizes train, on the task
    petkit train --model q4/ --method lora            # or LoRA over the integer base

Calibration windows come from the train split of an embedded text (`--calibration`, default
bbc-news: news articles), the held-out perplexity from its test split, both cut into windows of
`--seq-len` tokens. The report (perplexity of the full-precision and the quantised model, per-block
output MSE, settings, seconds) is printed and written as `quantize.json` in the folder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from petkit.core.errors import ConfigError

METHODS = ("efficientqat", "rtn")
TEXTS = ("bbc-news", "rotten-tomatoes", "chatterbot-qa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `petkit quantize`."""
    add = parser.add_argument
    add("--method", dest="qmethod", default="efficientqat", help=f"one of {', '.join(METHODS)}")
    add("--bits", default="int4", help="int4 | int3 | int2")
    add("--group-size", type=int, default=128, help="inputs per scale / zero point (a shorter last group where it does not divide a layer)")
    add("--model", default="smollm2-135m", help="embedded name or Hugging Face folder (a causal LM)")
    add("--calibration", default="bbc-news", help=f"embedded text: {', '.join(TEXTS)}")
    add("--samples", type=int, default=32, help="calibration windows")
    add("--seq-len", type=int, default=128, help="tokens per window")
    add("--epochs", type=int, default=2, help="Block-AP passes over the windows per block")
    add("--batch-size", dest="qbatch", type=int, default=4, help="windows per Block-AP step")
    add("--lr-weight", type=float, default=1e-4, help="Block-AP learning rate of the weights")
    add("--lr-quant", type=float, default=1e-3, help="Block-AP learning rate of scales and zero points")
    add("--e2e-steps", type=int, default=32, help="E2E-QP on the calibration windows after Block-AP: steps (step sizes only; 0: none)")
    add("--e2e-lr", type=float, default=1e-4, help="E2E-QP learning rate of the step sizes")
    add("--eval-samples", type=int, default=32, help="held-out windows for the perplexity (0: skip)")
    add("--seed", type=int, default=0, help="which calibration windows; Block-AP's order")
    add("--output", dest="qoutput", required=True, help="folder to write (transformers loads it)")
    add("--overwrite", action="store_true", help="replace a folder that holds files")


def _check_text(name: str) -> None:
    if name not in TEXTS:
        from difflib import get_close_matches

        close = get_close_matches(name, TEXTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--calibration must be one of {', '.join(TEXTS)}, got {name!r}{hint}")


def _texts(name: str) -> tuple[list[str], list[str]]:
    from petkit.data.embedded import load_embedded

    _check_text(name)
    task = load_embedded(name, 0.2, 0)  # the fixed split every petkit run of this task uses

    def text(row: dict[str, Any]) -> str:
        return " ".join(str(v) for k, v in row.items() if isinstance(v, str) and k != "label")

    return [text(r) for r in task.train], [text(r) for r in task.test]


def run(args: argparse.Namespace, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantise as the flags say, save the folder, return (and write) the report."""
    from petkit.compress import perplexity, quantize, save_quantized
    from petkit.compress.efficientqat import QatConfig
    from petkit.compress.qformat import text_windows
    from petkit.models import load_model

    output = Path(args.qoutput)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ConfigError(f"--output {output} already holds files (add --overwrite to replace them)")
    if args.qmethod not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {args.qmethod!r}")
    if args.bits not in ("int4", "int3", "int2"):
        raise ConfigError(f"--bits must be int4, int3 or int2, got {args.bits!r}")
    _check_text(args.calibration)  # mistakes fail before the model loads
    QatConfig(int(args.bits[3:]), args.group_size, args.epochs, args.qbatch, args.lr_weight, args.lr_quant,
              args.seed, args.e2e_steps, args.e2e_lr)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, task="causal-lm")
    train_texts, test_texts = _texts(args.calibration)
    calibration = text_windows(tokenizer, train_texts, args.seq_len, args.samples, args.seed)
    held_out = text_windows(tokenizer, test_texts, args.seq_len, args.eval_samples, 0) if args.eval_samples else None
    report: dict[str, Any] = {"model": args.model, "method": args.qmethod, "bits": args.bits,
                              "group_size": args.group_size, "calibration": args.calibration,
                              "samples": args.samples, "seq_len": args.seq_len, "epochs": args.epochs,
                              "lr_weight": args.lr_weight, "lr_quant": args.lr_quant, "seed": args.seed,
                              "e2e_steps": args.e2e_steps, "e2e_lr": args.e2e_lr}
    if held_out is not None:
        report["perplexity_full_precision"] = perplexity(model, held_out)
        echo(f"held-out perplexity, full precision: {report['perplexity_full_precision']:.3f}")
    mses: list[float] = []

    def progress(block: int, blocks: int, mse: float) -> None:
        mses.append(mse)
        echo(f"block {block}/{blocks}: output MSE vs full precision {mse:.3e}")

    quantize(model, args.bits, method=args.qmethod, calibration=calibration, group_size=args.group_size,
             epochs=args.epochs, batch_size=args.qbatch, lr_weight=args.lr_weight,
             lr_quant=args.lr_quant, seed=args.seed, e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr,
             progress=progress)
    report["block_mse"] = mses
    if held_out is not None:
        report["perplexity_quantized"] = perplexity(model, held_out)
        echo(f"held-out perplexity, {args.bits} {args.qmethod}: {report['perplexity_quantized']:.3f}")
    save_quantized(model, output, tokenizer)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (output / "quantize.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    echo(f"saved {output} (compressed-tensors; AutoModelForCausalLM.from_pretrained reads it); "
         f"E2E-QP: petkit train --model {output} --method peqa")
    return report
