"""`benchmarks/hybrid.py port`: a LoRA patch trained on SmolLM2 ported training-free to an evolved
SmolLM2 (PORTLLM) on rotten-tomatoes, against re-training on the new base (docs/hybrid.md,
"Porting a patch")."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import petkit as pk
from hybrid_common import OUT, accuracy, int_list, partial, record
from petkit.data import encode_classification, load_task
from petkit.models import load_model


def add_parser(sub: Any) -> None:
    p = sub.add_parser("port")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--retrain-seeds", type=int_list, default=[0],
                   help="seeds that also re-train the LoRA on the new base")
    p.add_argument("--cpt-steps", type=int, default=40)
    p.add_argument("--cpt-lr", type=float, default=5e-4)
    p.add_argument("--cpt-batch", type=int, default=8)
    p.add_argument("--cpt-len", type=int, default=64)


def rotten(tokenizer: Any, seed: int, n_train: int, max_length: int,
           n_test: int = 300) -> tuple[list, list, list]:
    """Encoded rotten-tomatoes train / test subsets and the verbaliser token ids."""
    from petkit.data import label_token_ids

    task = load_task("rotten-tomatoes")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(task.train), generator=generator).tolist()
    train = [task.train[i] for i in order[:n_train]]
    enc = lambda xs: encode_classification(xs, tokenizer, max_length=max_length,  # noqa: E731
                                           template=task.template)
    return enc(train), enc(task.test[:n_test]), label_token_ids(tokenizer, task.label_words)


def evolved_base(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The evolved SmolLM2 folder (built once): continued pre-training on chatterbot-corpus."""
    from petkit.hybrid import evolve_base

    folder = OUT / "smollm2-evolved"
    info_path = OUT / "smollm2-evolved.json"
    if (folder / "config.json").exists() and info_path.exists():
        return folder, json.loads(info_path.read_text())
    model, tok = load_model("smollm2-135m")
    task = load_task("chatterbot-qa")
    texts = [f"{e['prompt']} {e['completion']}" for e in task.train]
    cfg = pk.TrainConfig(lr=args.cpt_lr, max_steps=args.cpt_steps, batch_size=args.cpt_batch,
                         seed=0, warmup_steps=2, progress=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = evolve_base(model, tok, texts, folder, cfg, length=args.cpt_len)
    change = sum(float((model.state_dict()[k] - v).norm() ** 2) for k, v in before.items()) ** 0.5
    norm = sum(float(v.norm() ** 2) for v in before.values()) ** 0.5
    losses = [r["train_loss"] for r in res.history if "train_loss" in r]
    info = {"cpt_steps": args.cpt_steps, "cpt_lr": args.cpt_lr, "cpt_batch": args.cpt_batch,
            "cpt_len": args.cpt_len,
            "cpt_s": res.seconds, "cpt_first_loss": losses[0], "cpt_last_loss": losses[-1],
            "relative_weight_change": change / norm}
    info_path.write_text(json.dumps(info))
    return folder, info


def run(args: argparse.Namespace) -> None:
    from petkit.hybrid import port_adapter, ported_from

    folder, info = evolved_base(args)
    lora = pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    old, tok = load_model("smollm2-135m")
    new, _ = load_model(str(folder))
    pad = int(tok.pad_token_id)
    _, test, ids = rotten(tok, 0, 0, 64, args.test_size)
    acc = lambda m: accuracy(m, test, pad, label_token_ids=ids)  # noqa: E731
    untuned = {"old_untuned": acc(old), "new_untuned": acc(new)}  # the same for every seed
    partial(untuned)
    for seed in args.seeds:
        train, _, _ = rotten(tok, seed, args.train_size, 64, 0)
        cfg = pk.TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch, seed=seed,
                             label_token_ids=ids, progress=False)
        row: dict[str, Any] = {"seed": seed, "train": len(train), "test": len(test),
                               "steps": args.steps, "batch": args.batch, **info, **untuned}
        pk.attach(old, lora)
        res = pk.train(old, train, cfg, pad_id=pad)
        row["old_patched"], row["patch_train_s"] = acc(old), res.seconds
        patch = OUT / f"port-patch-{seed}"
        pk.save_adapter(old, patch)
        pk.detach(old, "default")
        started = time.perf_counter()
        port_adapter(patch, old, new, output=OUT / f"port-ported-{seed}")
        row["port_s"] = time.perf_counter() - started
        row["new_ported"] = acc(new)
        row["ported_from_recorded"] = ported_from(OUT / f"port-ported-{seed}") is not None
        pk.detach(new, "default")
        partial(row)
        gain = row["old_patched"] - row["old_untuned"]
        row["ported_gain_kept"] = (row["new_ported"] - row["new_untuned"]) / gain if gain else None
        if seed in args.retrain_seeds:
            pk.attach(new, lora)
            res = pk.train(new, train, cfg, pad_id=pad)
            row["new_retrained"], row["retrain_s"] = acc(new), res.seconds
            pk.detach(new, "default")
            regain = row["new_retrained"] - row["new_untuned"]
            row["ported_vs_retrained_gain"] = ((row["new_ported"] - row["new_untuned"]) / regain
                                               if regain else None)
        record("port", row)
