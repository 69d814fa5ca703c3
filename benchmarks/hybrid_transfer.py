"""`benchmarks/hybrid.py transfer`: module transfer small -> large (PET-GC) on bbc-news, against
the large model untuned and trained directly (docs/hybrid.md, "Module transfer")."""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import petkit as pk
from hybrid_common import accuracy, partial, record
from petkit.data import encode_classification, load_task, split_validation
from petkit.models import load_model
from petkit.models.loading import head_module_names


def add_parser(sub: Any) -> None:
    t = sub.add_parser("transfer")
    t.add_argument("--train-size", type=int, default=800)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--zo-steps", type=int, default=10)
    t.add_argument("--zo-lr", type=float, default=1e-4)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--align-size", type=int, default=64)
    t.add_argument("--test-size", type=int, default=300)


def bbc_data(tokenizer: Any, seed: int, n_train: int, max_length: int,
             test_size: int = 300) -> tuple[list, list, list]:
    task = load_task("bbc-news")
    train = sorted(task.train, key=lambda e: e["text"])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    train = [train[i] for i in order[: n_train + 100]]
    train, val = split_validation(train, 100 / len(train), seed)
    test = task.test[:test_size]
    enc = lambda xs: encode_classification(xs, tokenizer, max_length=max_length)  # noqa: E731
    return enc(train), enc(val), enc(test)


def lora_head(model: torch.nn.Module) -> pk.LoraConfig:
    return pk.LoraConfig(r=8, alpha=16, targets=["query", "value"],
                         modules_to_save=head_module_names(model))


def large_model() -> torch.nn.Module:
    return load_model("minilm-l6", task="seq-cls", num_labels=5)[0]


def transfer_arms(small: Any, train: list, test: list, pad: int, args: argparse.Namespace,
                  row: dict[str, Any]) -> Any:
    """The large model untuned, then with the small adapter transferred three ways (default
    hidden alignment, embeddings, hidden-base); returns the default-transferred large model."""
    from petkit.hybrid import TransferConfig, transfer_adapter

    large = large_model()
    row["large_untuned"] = accuracy(large, test, pad)
    # the default: hidden-state alignment on a few training texts (small model with its
    # adapter, large base), one forward pass of each model
    started = time.perf_counter()
    t = transfer_adapter("default", small, large, align_data=train[: args.align_size],
                         pad_id=pad)
    row["align_transfer_s"] = time.perf_counter() - started
    row["align_passes"] = 2 * args.align_size
    row["hidden_alignment_error"] = t.alignment_error
    row["layer_map"] = t.layer_map
    row["large_transferred_hidden"] = accuracy(large, test, pad)
    partial(row)
    embedded = large_model()
    started = time.perf_counter()
    t = transfer_adapter("default", small, embedded, config=TransferConfig(align="embeddings"))
    row["transfer_s"], row["alignment_error"] = time.perf_counter() - started, t.alignment_error
    row["large_transferred"] = accuracy(embedded, test, pad)
    bases = large_model()
    transfer_adapter("default", small, bases, config=TransferConfig(align="hidden-base"),
                     align_data=train[: args.align_size], pad_id=pad)
    row["large_transferred_hidden_base"] = accuracy(bases, test, pad)
    partial(row)
    return large


def run(args: argparse.Namespace) -> None:
    from petkit.hybrid import minilm_l3_dir

    for seed in args.seeds:
        small, tok = load_model(str(minilm_l3_dir()), task="seq-cls", num_labels=5)
        train, val, test = bbc_data(tok, seed, args.train_size, args.max_length, args.test_size)
        pad = int(tok.pad_token_id)
        cfg = pk.TrainConfig(lr=2e-3, max_steps=args.steps, batch_size=16, warmup_ratio=0.1,
                             seed=seed, progress=False)
        pk.attach(small, lora_head(small))
        res_small = pk.train(small, train, cfg, pad_id=pad)
        row: dict[str, Any] = {"seed": seed, "train": len(train), "test": len(test),
                               "max_length": args.max_length, "steps": args.steps,
                               "small_trained": accuracy(small, test, pad),
                               "small_train_s": res_small.seconds}
        partial(row)
        backprop_passes = 2 * args.steps * 16
        large = transfer_arms(small, train, test, pad, args, row)
        if args.zo_steps:  # gradient-free refinement of the default (hidden-aligned) transfer
            zo = pk.TrainConfig(lr=args.zo_lr, max_steps=args.zo_steps, batch_size=16,
                                optimizer="mezo", schedule="constant", seed=seed, progress=False,
                                max_grad_norm=None)
            res_zo = pk.train(large, train, zo, pad_id=pad)
            row["large_refined"] = accuracy(large, test, pad)
            row["refine_s"], row["refine_passes"] = res_zo.seconds, 2 * args.zo_steps * 16
            partial(row)

        direct = large_model()
        pk.attach(direct, lora_head(direct))
        res = pk.train(direct, train, cfg, pad_id=pad)
        row["large_direct"] = accuracy(direct, test, pad)
        row["direct_s"], row["direct_passes"] = res.seconds, backprop_passes
        shares(row, backprop_passes)
        record("transfer", row)


def shares(row: dict[str, Any], backprop_passes: int) -> None:
    """Each transferred arm's share of the untuned -> direct gap, and the compute shares."""
    gap = row["large_direct"] - row["large_untuned"]
    for arm in ("large_transferred", "large_transferred_hidden",
                "large_transferred_hidden_base", "large_refined"):
        if arm in row:
            row[f"{arm}_gap_recovered"] = (row[arm] - row["large_untuned"]) / gap if gap else None
    row["align_compute_share"] = row["align_passes"] / backprop_passes
    if "refine_passes" in row:
        passes = row["align_passes"] + row["refine_passes"]
        row["refine_compute_share"] = passes / backprop_passes
