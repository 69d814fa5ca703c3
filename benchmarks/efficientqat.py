"""Held-out perplexity of SmolLM2-135M: full precision vs RTN vs EfficientQAT Block-AP, int4/3/2.

    nice -n 10 python benchmarks/efficientqat.py --group-size 128 --seeds 0,1,2 --out runs/eqat.jsonl

One process, the model loaded once and copied per arm; every arm's result is appended to --out as
a JSON line as soon as it is measured, seed by seed (every bit width of seed 0 first, so a run
cut short still has each width once). Calibration: bbc-news train split; held-out: its test split
(the same windows for every arm). RTN is deterministic (one row per bit width).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from petkit.cli_quantize import _texts
from petkit.compress import perplexity, quantize
from petkit.compress.qformat import text_windows
from petkit.models import load_model


def render(path: str) -> str:
    """The docs' table from the JSON lines: each arm's perplexity against fp32 and against RTN."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    fp32 = next(r["perplexity"] for r in rows if r["arm"] == "fp32")
    rtn = {r["bits"]: r["perplexity"] for r in rows if r["arm"] == "rtn"}
    lines = ["| arm | bits | seed | perplexity | vs fp32 | vs RTN | seconds |", "|---|---|---|---:|---:|---:|---:|",
             f"| fp32 | - | - | {fp32:.2f} | - | - | - |"]
    for r in rows[1:]:
        base = rtn.get(r["bits"])
        versus = "-" if r["arm"] == "rtn" or base is None else f"{100 * (r['perplexity'] / base - 1):+.1f}%"
        lines.append(f"| {r['arm']} | {r['bits']} | {r.get('seed', '-')} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / fp32 - 1):+.1f}% | {versus} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", default="int4,int3,int2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--render", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args()
    if args.render:
        print(render(args.out))
        return
    model, tokenizer = load_model("smollm2-135m", task="causal-lm")
    train_texts, test_texts = _texts("bbc-news")
    held_out = text_windows(tokenizer, test_texts, args.seq_len, args.eval_samples, 0)
    settings = {"group_size": args.group_size, "samples": args.samples, "seq_len": args.seq_len,
                "epochs": args.epochs, "eval_windows": args.eval_samples}

    def record(**row: object) -> None:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**row, **settings}) + "\n")

    record(arm="fp32", perplexity=perplexity(model, held_out))
    for position, seed in enumerate(int(s) for s in args.seeds.split(",")):
        for bits in args.bits.split(","):
            if position == 0:  # RTN is deterministic: one row per bit width
                started = time.perf_counter()
                rtn = quantize(copy.deepcopy(model), bits, method="rtn", group_size=args.group_size)
                record(arm="rtn", bits=bits, perplexity=perplexity(rtn, held_out),
                       seconds=round(time.perf_counter() - started, 1))
                del rtn
            started = time.perf_counter()
            calibration = text_windows(tokenizer, train_texts, args.seq_len, args.samples, seed)
            qat = quantize(copy.deepcopy(model), bits, method="efficientqat", calibration=calibration,
                           group_size=args.group_size, epochs=args.epochs, seed=seed)
            record(arm="efficientqat", bits=bits, seed=seed, perplexity=perplexity(qat, held_out),
                   seconds=round(time.perf_counter() - started, 1))
            del qat

if __name__ == "__main__":
    main()
