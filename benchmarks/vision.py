"""Vision benchmark: dinov2-s on mnist-5k — VPT, LoRA, linear probing, full fine-tuning, and PVP.

`full`:    every arm on the whole task (10 digits, 4,000 train / 1,000 test), fixed steps.
`fewshot`: digits 5-9 with k shots per class; VPT-deep started from scratch or from prompts
           pre-trained on digits 0-4 (PVP), against linear probing and full fine-tuning.
`report`:  markdown tables (mean and spread over seeds) and docs/vision_fewshot.png.

Every cell trains the same way (AdamW, linear decay, fixed steps, no validation split: the test
split is scored once, at the end, and never used to choose anything). Images are resized per batch
(no cached features). Results are appended to a JSON-lines file; a finished cell is skipped on a
rerun, so the grid can grow (more seeds) without redoing work. Commands: docs/vision.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import petkit as pk
from petkit.core.delta import iter_deltas
from petkit.data.images import collate_images, encode_images, few_shot, load_mnist_5k, select_classes
from petkit.methods.vpt import VptBlock
from petkit.models.vision import load_vision_model
from petkit.training.evaluate import evaluate

ARMS: dict[str, dict[str, Any] | None] = {  # None: a baseline trained without petkit's delta
    "linear-probe": None,
    "full": None,
    "vpt-shallow": {"name": "vpt", "num_virtual_tokens": 10},
    "vpt-deep": {"name": "vpt", "num_virtual_tokens": 10, "deep": True},
    "lora": {"name": "lora", "r": 8},
}
# One AdamW rate per arm; the new head trains at it too. 1e-2 overshoots the head (DINOv2's
# features are large: a first run at 1e-2 left VPT-deep at chance, docs/vision.md); full
# fine-tuning moves 22M weights, so it gets 1e-4.
LR = {"linear-probe": 1e-3, "full": 1e-4, "vpt-shallow": 1e-3, "vpt-deep": 1e-3, "lora": 1e-3,
      "pvp": 1e-3}
OUT = Path("docs/vision")
LABELS = {"vpt-deep": "VPT-deep from scratch", "pvp": "VPT-deep from digits 0-4 (PVP)",
          "full": "full fine-tuning", "linear-probe": "linear probe"}


def build(arm: str, num_labels: int, seed: int) -> tuple[torch.nn.Module, dict, int]:
    """The model for `arm` (head re-initialised with `seed`), the parameters it trains and the
    backbone's parameter count."""
    model = load_vision_model("dinov2-s", num_labels)
    backbone = sum(p.numel() for p in model.dinov2.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
    spec = ARMS["vpt-deep" if arm == "pvp" else arm]
    if spec is None:  # baselines: the head alone, or everything
        for p in model.parameters():
            p.requires_grad_(arm == "full")
        chosen = model if arm == "full" else model.classifier
        for p in chosen.parameters():
            p.requires_grad_(True)
        return model, dict(chosen.named_parameters()), backbone
    fields = {k: v for k, v in spec.items() if k != "name"}
    fields |= {"seed": seed} if spec["name"] == "vpt" else {}
    pk.attach(model, pk.make_config(spec["name"], modules_to_save=["classifier"], **fields))
    return model, dict(pk.trainable_parameters(model)), backbone


def prompts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """VPT tokens by block path (found by structure)."""
    return {path: w.prompt.detach().clone() for path, w in iter_deltas(model)
            if isinstance(w, VptBlock) and w.prompt is not None}


def load_prompts(model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, w in iter_deltas(model):
            if isinstance(w, VptBlock) and w.prompt is not None:
                w.prompt.copy_(tokens[path])


def run_cell(arm: str, train: list[dict], test: list[dict], *, num_labels: int, steps: int,
             batch: int, seed: int, size: int, init: dict[str, torch.Tensor] | None = None,
             keep: bool = False) -> dict[str, Any]:
    """Train one arm, score the test split once; `init`: PVP's pre-trained tokens."""
    started = time.perf_counter()
    model, params, backbone = build(arm, num_labels, seed)
    if init is not None:
        load_prompts(model, init)
    collate = functools.partial(collate_images, image_size=size)
    config = pk.TrainConfig(lr=LR[arm], max_steps=steps, batch_size=min(batch, len(train)),
                            seed=seed, progress=False, log_every=max(1, steps // 5))
    model.train()
    pk.train(model, encode_images(train), config, collate_fn=collate, parameters=params)
    metrics = evaluate(model, encode_images(test), batch_size=64, collate_fn=collate)
    head = (2 * model.config.hidden_size + 1) * num_labels  # linear on [CLS ; mean of patches]
    trained = sum(p.numel() for p in params.values())
    row = {"arm": arm, "seed": seed, "steps": steps, "image_size": size, "train": len(train),
           "test": len(test), "accuracy": metrics["accuracy"], "trainable": trained,
           "trainable_without_head": trained - head, "percent_of_backbone": 100 * trained / backbone,
           "seconds": round(time.perf_counter() - started, 1)}
    if keep:
        row["_prompts"] = prompts(model)
    return row


def _done(out: Path) -> set[str]:
    if not out.exists():
        return set()
    return {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}


def _append(out: Path, key: str, row: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps({"key": key, **row}) + "\n")
    print(json.dumps(row), flush=True)


def full_grid(args: argparse.Namespace) -> None:
    task = load_mnist_5k()
    test = task.test[: args.test_size]
    out, done = Path(args.out), _done(Path(args.out))
    for seed in args.seeds:
        for arm in args.arms:
            key = f"full/{arm}/{seed}/{args.steps}/{args.size}"
            if key not in done:
                _append(out, key, run_cell(arm, task.train, test, num_labels=10, steps=args.steps,
                                           batch=args.batch, seed=seed, size=args.size))


def pretrained_prompts(args: argparse.Namespace, task: Any) -> dict[str, torch.Tensor]:
    """VPT-deep tokens trained on digits 0-4 (cached as safetensors next to the results)."""
    from safetensors.torch import load_file, save_file

    cache = Path(args.out).with_name(f"pvp_prompts_{args.pre_steps}_{args.size}.safetensors")
    if cache.exists():
        return load_file(cache)
    source = select_classes(task.train, [0, 1, 2, 3, 4])
    source_test = select_classes(task.test, [0, 1, 2, 3, 4])
    row = run_cell("vpt-deep", source, source_test, num_labels=5, steps=args.pre_steps,
                   batch=args.batch, seed=0, size=args.size, keep=True)
    tokens = row.pop("_prompts")
    _append(Path(args.out), f"pretrain/{args.pre_steps}/{args.size}", {**row, "arm": "pretrain 0-4"})
    save_file(tokens, cache)
    return tokens


def fewshot_grid(args: argparse.Namespace) -> None:
    task = load_mnist_5k()
    classes = [5, 6, 7, 8, 9]
    pool, test = select_classes(task.train, classes), select_classes(task.test, classes)
    init = pretrained_prompts(args, task) if "pvp" in args.arms else None
    out, done = Path(args.out), _done(Path(args.out))
    for seed in args.seeds:
        for shots in args.shots:
            train = few_shot(pool, shots, seed)
            for arm in args.arms:
                key = f"fewshot/{arm}/{shots}/{seed}/{args.steps}/{args.size}"
                if key not in done:
                    row = run_cell(arm, train, test[: args.test_size], num_labels=5,
                                   steps=args.steps, batch=args.batch, seed=seed, size=args.size,
                                   init=init if arm == "pvp" else None)
                    _append(out, key, {**row, "shots": shots})


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for path in args.inputs for line in Path(path).read_text().splitlines()
            if line.strip()]
    full = [r for r in rows if r["key"].startswith("full/")]
    if full:
        print("| arm | test accuracy % | seeds | trainable (of which not head) | % of backbone | s/run |")
        print("|---|---|---|---|---|---|")
        for arm in dict.fromkeys(r["arm"] for r in full):
            sel = [r for r in full if r["arm"] == arm]
            print(f"| {arm} | {_cell([r['accuracy'] for r in sel])} | {len(sel)} | "
                  f"{sel[0]['trainable']:,} ({sel[0]['trainable_without_head']:,}) | "
                  f"{sel[0]['percent_of_backbone']:.2f} | {statistics.mean(r['seconds'] for r in sel):.0f} |")
    few = [r for r in rows if r["key"].startswith("fewshot/")]
    if few:
        arms = list(dict.fromkeys(r["arm"] for r in few))
        shots = sorted({r["shots"] for r in few})
        print("\n| shots/class | " + " | ".join(arms) + " |")
        print("|---" * (len(arms) + 1) + "|")
        for k in shots:
            cells = [_cell([r["accuracy"] for r in few if r["arm"] == a and r["shots"] == k])
                     if any(r["arm"] == a and r["shots"] == k for r in few) else "-" for a in arms]
            print(f"| {k} | " + " | ".join(cells) + " |")
        _plot(few, arms, shots)


def _plot(few: list[dict], arms: list[str], shots: list[int]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        xs = [k for k in shots if any(r["arm"] == arm and r["shots"] == k for r in few)]
        ys = [100 * statistics.mean(r["accuracy"] for r in few if r["arm"] == arm and r["shots"] == k)
              for k in xs]
        ax.plot(xs, ys, marker="o", label=LABELS.get(arm, arm))
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class (digits 5-9)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("dinov2-s few-shot: PVP (prompts from digits 0-4) vs scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig("docs/vision_fewshot.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    for name in ("full", "fewshot"):
        p = sub.add_parser(name)
        p.add_argument("--arms", type=lambda t: t.split(","),
                       default=list(ARMS) if name == "full" else ["linear-probe", "full", "vpt-deep", "pvp"])
        p.add_argument("--seeds", type=ints, default=[0])
        p.add_argument("--steps", type=int, default=150 if name == "full" else 40)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--size", type=int, default=56, help="image side (multiple of 14)")
        p.add_argument("--test-size", type=int, default=1000)
        p.add_argument("--out", default=str(OUT / f"{name}.jsonl"))
        if name == "fewshot":
            p.add_argument("--shots", type=ints, default=[1, 2, 4, 8, 16])
            p.add_argument("--pre-steps", type=int, default=150)
    r = sub.add_parser("report")
    r.add_argument("inputs", nargs="*", default=[str(OUT / "full.jsonl"), str(OUT / "fewshot.jsonl")])
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"full": full_grid, "fewshot": fewshot_grid, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
