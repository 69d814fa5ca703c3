"""Block-AP's calibration budget on SmolLM2-135M: what more windows / epochs / other rates give.

    nice -n 10 python benchmarks/efficientqat_budget.py blocks --out runs/eqat_blocks.jsonl
    nice -n 10 python benchmarks/efficientqat_budget.py full --samples 128 --epochs 2 --out runs/eqat_budget.jsonl
    nice -n 10 python benchmarks/efficientqat_budget.py baselines --out runs/eqat_budget.jsonl

Choices are made on *validation* windows of bbc-news' train split, disjoint from the calibration
windows (one seeded pool: the first 32 of its permutation validate, the next `--samples`
calibrate, so a larger budget holds the smaller one's windows); the test split is read only for
the reported perplexity (the same 32 windows as benchmarks/efficientqat.py). `blocks`: each
setting on the first three blocks, quantised and chained as Block-AP does, scored by the output
MSE on the validation windows (the fast signal). `full`: every block, then the validation and the
test perplexity (`--e2e-steps`: then E2E-QP on the calibration windows, once per rate of `--e2e-lrs`, each
from the same Block-AP model); `baselines`: fp32 and
RTN on the same windows. Each setting's row is appended to --out as soon as it is measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from petkit.cli_quantize import _texts
from petkit.compress import perplexity, quantize
from petkit.compress.efficientqat import (QatConfig, _run, block_ap, block_inputs, e2e_qp, fit_block,
                                         rtn_grids, set_grid)
from petkit.compress.qformat import text_windows
from petkit.core.blocks import layer_paths
from petkit.models import load_model

VALIDATION = 32


def split(tokenizer: object, largest: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation windows, calibration pool) from the train split, disjoint."""
    train, _ = _texts("bbc-news")
    pool = text_windows(tokenizer, train, 128, VALIDATION + largest, 1000 + seed)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order[:VALIDATION]], pool[order[VALIDATION:]]


def first_blocks(model: torch.nn.Module, cal: torch.Tensor, val: torch.Tensor, config: QatConfig,
                 blocks: int = 3) -> list[float]:
    """Validation output MSE of the first `blocks` blocks after Block-AP (epochs 0: RTN)."""
    model = copy.deepcopy(model).eval()
    stack = layer_paths(model)
    q_c, kw = block_inputs(model, model.get_submodule(stack[0]), cal, config.batch_size)
    q_v, kwv = block_inputs(model, model.get_submodule(stack[0]), val, config.batch_size)
    fp_c, fp_v, mses = q_c, q_v, []
    for path in stack[:blocks]:
        block = model.get_submodule(path)
        with torch.no_grad():
            t_c = [_run(block, x, k) for x, k in zip(fp_c, kw)]
            t_v = [_run(block, x, k) for x, k in zip(fp_v, kwv)]
        grids = fit_block(block, q_c, t_c, kw, config) if config.epochs else rtn_grids(block, config)
        for sub, grid in grids.items():
            set_grid(block.get_submodule(sub), *grid)
        with torch.no_grad():
            q_c = [_run(block, x, k) for x, k in zip(q_c, kw)]
            q_v = [_run(block, x, k) for x, k in zip(q_v, kwv)]
        fp_c, fp_v = t_c, t_v
        mses.append(sum(F.mse_loss(a, b).item() for a, b in zip(q_v, t_v)) / len(t_v))
    return mses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("blocks", "full", "baselines"))
    parser.add_argument("--bits", default="int4")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr-weight", type=float, default=1e-4)
    parser.add_argument("--lr-quant", type=float, default=1e-3)
    parser.add_argument("--settings", default="32:2:1e-4:1e-3,128:2:1e-4:1e-3",
                        help="blocks mode: samples:epochs:lr_weight:lr_quant, comma-separated")
    parser.add_argument("--e2e-steps", type=int, default=0)
    parser.add_argument("--e2e-lrs", default="1e-4", help="E2E-QP rates, each from the same Block-AP model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", task="causal-lm")
    bits = {"int4": 4, "int3": 3, "int2": 2}[args.bits]

    def record(**row: object) -> None:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"bits": args.bits, "seed": args.seed, **row}) + "\n")

    if args.mode == "blocks":
        settings = [s.split(":") for s in args.settings.split(",")]
        val, pool = split(tokenizer, max(int(s[0]) for s in settings), args.seed)
        for samples, epochs, lw, lq in settings:
            started = time.perf_counter()
            config = QatConfig(bits, 128, int(epochs), 4, float(lw), float(lq), args.seed)
            mses = first_blocks(model, pool[:int(samples)], val, config)
            record(mode="blocks", samples=int(samples), epochs=int(epochs), lr_weight=float(lw),
                   lr_quant=float(lq), val_mse=mses, seconds=round(time.perf_counter() - started, 1))
        return
    val, pool = split(tokenizer, args.samples, args.seed)
    _, test_texts = _texts("bbc-news")
    test = text_windows(tokenizer, test_texts, 128, 32, 0)
    if args.mode == "baselines":  # fp32, then RTN, on the same validation and test windows
        for arm in ("fp32", "rtn"):
            if arm == "rtn":
                quantize(model, args.bits, method="rtn", group_size=128)
            record(mode=arm, val_perplexity=perplexity(model, val), test_perplexity=perplexity(model, test))
        return
    config = QatConfig(bits, 128, args.epochs, 4, args.lr_weight, args.lr_quant, args.seed, args.e2e_steps)
    started = time.perf_counter()
    mses: list[float] = []
    grids = block_ap(model, pool[:args.samples], config, lambda _b, _n, mse: mses.append(mse))
    settings = {"samples": args.samples, "epochs": args.epochs, "lr_weight": args.lr_weight,
                "lr_quant": args.lr_quant, "last_block_mse": mses[-1]}
    record(mode="full", **settings, seconds=round(time.perf_counter() - started, 1),
           val_perplexity=perplexity(model, val), test_perplexity=perplexity(model, test))
    for lr in (float(x) for x in args.e2e_lrs.split(",") if args.e2e_steps):
        started, tuned = time.perf_counter(), copy.deepcopy(model)
        e2e_qp(tuned, grids, pool[:args.samples], replace(config, e2e_lr=lr))
        record(mode="full+e2e", **settings, e2e_steps=args.e2e_steps, e2e_lr=lr,
               seconds=round(time.perf_counter() - started, 1),
               val_perplexity=perplexity(tuned, val), test_perplexity=perplexity(tuned, test))


if __name__ == "__main__":
    main()
