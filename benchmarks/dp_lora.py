"""DP LoRA vs non-private LoRA on rotten-tomatoes at the same step budget (docs/privacy.md).

    # selection (seed 0, validation examples carved from the training split; test never read):
    nice -n 10 python benchmarks/dp_lora.py --split validation --lr 3e-3,1e-2 --out runs/dp.jsonl
    # the reported cells (test split, 3 seeds, DP and non-private):
    nice -n 10 python benchmarks/dp_lora.py --split test --seeds 0,1,2 --arms dp,plain --out runs/dp.jsonl

One cell per (arm, seed, lr, rank) through petkit's own pipeline (`app.pipeline.prepare`, the
recipe's model, data and LoRA; `training.train` with `TrainConfig.dp` for the DP arm); each cell
is appended to --out as a JSON line when it ends. With --split validation the training examples
are drawn from N + V with V held out (`data.validation_size`) and the cell reports accuracy on
those V only.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any


def cell(args: argparse.Namespace, arm: str, seed: int, lr: float, rank: int) -> dict[str, Any]:
    """Train one LoRA (DP or not) and score it on the validation or the test examples."""
    import torch

    import petkit as pk
    from petkit.app.pipeline import method_config, prepare
    from petkit.app.recipe import DataSpec, ModelSpec, Recipe
    from petkit.models import head_module_names
    from petkit.models.loading import NEW_MODULES_ATTR
    from petkit.training import evaluate, train

    val = args.val if args.split == "validation" else 0
    data = DataSpec(name="rotten-tomatoes", task_type="auto", train_size=args.train_size + val if args.train_size else None,
                    validation_size=val, test_size=args.test_size, max_length=args.max_length)
    dp = pk.DPConfig(epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.clip,
                     per_example=args.per_example) if arm == "dp" else None
    config = pk.TrainConfig(lr=lr, head_lr=args.head_lr, max_steps=args.steps, batch_size=args.batch_size, warmup_ratio=0.1,
                            schedule="linear", seed=seed, progress=False, log_every=1000, dp=dp)
    method = {"name": "lora", "r": rank, "alpha": args.alpha or 2 * rank}
    if args.targets:
        method["targets"] = args.targets.split(",")
    rec = Recipe(method=method, model=ModelSpec(args.model), data=data, train=config)
    torch.manual_seed(seed)
    prep, _ = prepare(rec)
    if args.head == "classifier":  # the new random pooler stays frozen: fewer noised coordinates
        new = [m for m in head_module_names(prep.model) if m.split(".")[-1] == "classifier"]
        setattr(prep.model, NEW_MODULES_ATTR, new)
    pk.attach(prep.model, method_config(rec, prep))
    trainable = sum(p.numel() for p in pk.trainable_parameters(prep.model).values())
    started = time.perf_counter()
    result = train(prep.model, prep.train, config.replace(label_token_ids=prep.label_token_ids),
                   pad_id=prep.pad_id, collate_fn=prep.collate)
    examples = prep.validation if val else prep.test
    accuracy = evaluate(prep.model, examples, batch_size=32, pad_id=prep.pad_id,
                        label_token_ids=prep.label_token_ids, collate_fn=prep.collate)["accuracy"]
    return {"arm": arm, "seed": seed, "lr": lr, "head_lr": args.head_lr, "rank": rank, "alpha": method["alpha"], "targets": args.targets or "default",
            "split": args.split, "head": args.head, "trainable": trainable, "accuracy": accuracy, "examples": len(examples),
            "train_size": len(prep.train), "max_length": args.max_length, "steps": result.steps, "batch_size": args.batch_size,
            "model": args.model, "epsilon_spent": result.report.get("dp_epsilon"),
            "sigma": result.report.get("dp_noise_multiplier"), "train_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--split", choices=("validation", "test"), required=True)
    parser.add_argument("--arms", default="dp", help="dp,plain")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", default="3e-3")
    parser.add_argument("--rank", default="8")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (none: 2 x rank)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--targets", default="", help="comma-separated LoRA targets (default: petkit's)")
    parser.add_argument("--head", choices=("all", "classifier"), default="all",
                        help="which new head modules train: all (petkit's default) or the classifier only")
    parser.add_argument("--head-lr", type=float, default=None, help="rate of the new head (none: --lr)")
    parser.add_argument("--train-size", type=int, default=2000, help="0: the whole training pool")
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--per-example", default="vmap")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            for lr in (float(x) for x in args.lr.split(",")):
                for rank in (int(r) for r in args.rank.split(",")):
                    row = cell(args, arm, seed, lr, rank)
                    print(json.dumps(row), flush=True)
                    with open(args.out, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
