"""The measurements of docs/hybrid.md: module transfer (PET-GC), patch porting (PORTLLM), preference
tuning (DPO / MEET). One subcommand per system; each prints one JSON line per seed and appends it
to runs/hybrid/<system>.jsonl.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/hybrid.py transfer --seeds 0
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/hybrid.py port --seeds 0
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/hybrid.py prefer --seeds 0

Compute is counted in passes over single examples: a backprop step over a batch of B is B
forward + B backward passes, a MeZO step 2B forward passes; wall seconds are reported too (the
CPU is shared, so they are noisy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import petkit as pk
from petkit.data import encode_classification, load_task, split_validation
from petkit.models import load_model
from petkit.models.loading import head_module_names

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "hybrid"


def record(system: str, row: dict[str, Any]) -> None:
    """Print and append one result row."""
    OUT.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT / f"{system}.jsonl", "a") as fh:
        fh.write(line + "\n")


def accuracy(model: torch.nn.Module, data: list[dict], pad_id: int, **kw: Any) -> float:
    """Test accuracy (eval mode, no grad)."""
    with torch.no_grad():
        return pk.evaluate(model, data, batch_size=32, pad_id=pad_id, **kw)["accuracy"]


# --- 1. transfer ---------------------------------------------------------------------------


def bbc_data(tokenizer: Any, seed: int, n_train: int, max_length: int) -> tuple[list, list, list]:
    task = load_task("bbc-news")
    train = sorted(task.train, key=lambda e: e["text"])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    train = [train[i] for i in order[: n_train + 100]]
    train, val = split_validation(train, 100 / len(train), seed)
    test = task.test[:300]
    enc = lambda xs: encode_classification(xs, tokenizer, max_length=max_length)  # noqa: E731
    return enc(train), enc(val), enc(test)


def lora_head(model: torch.nn.Module) -> pk.LoraConfig:
    return pk.LoraConfig(r=8, alpha=16, targets=["query", "value"],
                         modules_to_save=head_module_names(model))


def cmd_transfer(args: argparse.Namespace) -> None:
    from petkit.hybrid import minilm_l3_dir, transfer_adapter

    for seed in args.seeds:
        small, tok = load_model(str(minilm_l3_dir()), task="seq-cls", num_labels=5)
        train, val, test = bbc_data(tok, seed, args.train_size, args.max_length)
        pad = int(tok.pad_token_id)
        cfg = pk.TrainConfig(lr=2e-3, max_steps=args.steps, batch_size=16, warmup_ratio=0.1,
                             seed=seed, progress=False)
        pk.attach(small, lora_head(small))
        res_small = pk.train(small, train, cfg, pad_id=pad)
        row: dict[str, Any] = {"seed": seed, "train": len(train), "test": len(test),
                               "max_length": args.max_length, "steps": args.steps,
                               "small_trained": accuracy(small, test, pad),
                               "small_train_s": res_small.seconds}
        backprop_passes = 2 * args.steps * 16

        large, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
        row["large_untuned"] = accuracy(large, test, pad)
        started = time.perf_counter()
        t = transfer_adapter("default", small, large)
        row["transfer_s"] = time.perf_counter() - started
        row["alignment_error"] = t.alignment_error
        row["layer_map"] = t.layer_map
        row["large_transferred"] = accuracy(large, test, pad)
        zo = pk.TrainConfig(lr=args.zo_lr, max_steps=args.zo_steps, batch_size=16,
                            optimizer="mezo", schedule="constant", seed=seed, progress=False,
                            max_grad_norm=None)
        res_zo = pk.train(large, train, zo, pad_id=pad)
        row["large_refined"] = accuracy(large, test, pad)
        row["refine_s"], row["refine_passes"] = res_zo.seconds, 2 * args.zo_steps * 16

        direct, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
        pk.attach(direct, lora_head(direct))
        res = pk.train(direct, train, cfg, pad_id=pad)
        row["large_direct"] = accuracy(direct, test, pad)
        row["direct_s"], row["direct_passes"] = res.seconds, backprop_passes
        gap = row["large_direct"] - row["large_untuned"]
        for arm in ("large_transferred", "large_refined"):
            row[f"{arm}_gap_recovered"] = (row[arm] - row["large_untuned"]) / gap if gap else None
        row["refine_compute_share"] = row["refine_passes"] / backprop_passes
        record("transfer", row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transfer")
    t.add_argument("--train-size", type=int, default=800)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--zo-steps", type=int, default=10)
    t.add_argument("--zo-lr", type=float, default=1e-4)
    t.add_argument("--max-length", type=int, default=128)
    for p in sub.choices.values():
        p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    {"transfer": cmd_transfer}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
