"""Requested-sentiment rate of CLI preference runs (docs/objectives.md), the measure of
docs/hybrid.md: the share of 40 greedy generations (24 new tokens, no repeated 3-grams) for the
held-out movies of the run's seed, both sentiments each, that docs/hybrid.md's sentiment judge
(minilm-l6 + LoRA, trained once on rotten-tomatoes, cached in runs/hybrid/judge) labels with the
requested sentiment. The untuned model of each seed is scored too.

`--split validation` scores 20 other movies instead: the first 20 of the seed's movies that are
neither held out nor trained on (`split_movies`' rest), for choosing a recipe's defaults without
looking at the held-out movies. Each row also carries the pair accuracy of that split's 40 pairs
(`objectives_eval.pair_accuracy`, the CLI's measure) and what decides it: the pairs are swapped
twins (one movie's two reviews, chosen and rejected trading places with the request), so a pair
is won beyond one per twin only where the request moves the two reviews' mean token
log-probabilities further apart than they already are: `review_gap` (mean |gap| in nats per
token under the negative request) against `request_shift` (how far the positive request moves
the gap towards the positive review, mean over movies) and `shift_right` (share of movies where
it moves that way).

    python benchmarks/sentiment_rate.py runs/dpo runs/orpo --clf-steps 100 --out rates.json
    python benchmarks/sentiment_rate.py runs/dpo runs/rpo --split validation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import petkit as pk  # noqa: E402
from hybrid_prefer import generate, requested_probs, scores, sentiment_judge  # noqa: E402
from petkit.data.objective_tasks import (EVAL_MOVIES, TRAIN_MOVIES, movie_reviews,  # noqa: E402
                                         preference_pairs, prompt_of, split_movies)
from petkit.models import load_model  # noqa: E402
from petkit.training.objectives_eval import pair_accuracy  # noqa: E402
from petkit.training.objectives_preference import (IGNORE, encode_pairs,  # noqa: E402
                                                   pair_collate, sequence_logp)

SPLITS = ("test", "validation")
MAX_LENGTH = 64  # the dpo recipe's data.max_length


def split_movie_names(seed: int, split: str) -> list[str]:
    """The seed's 20 held-out movies ("test") or the first 20 unused ones ("validation")."""
    held, _, rest = split_movies(list(movie_reviews()), seed, EVAL_MOVIES, TRAIN_MOVIES)
    return held if split == "test" else rest[:EVAL_MOVIES]


def rate(adapter: Path | None, seed: int, judge: tuple[Any, Any], new_tokens: int,
         split: str = "test") -> dict:
    """Score the model (with `adapter`, or untuned) on the split's 40 prompts: requested-
    sentiment rate of its greedy generations, and pair accuracy of the split's pairs."""
    model, tok = load_model("smollm2-135m")
    if adapter is not None:
        pk.load_adapter(model, adapter)
    model.eval()
    names = split_movie_names(seed, split)
    prompts, wanted = [prompt_of(m, s) for m in names for s in (0, 1)], [0, 1] * len(names)
    texts = generate(model, tok, prompts, new_tokens)
    share, prob = scores(requested_probs(*judge, texts, wanted))
    pairs = encode_pairs(preference_pairs(movie_reviews(), names, 1), tok, MAX_LENGTH)
    return {"split": split, "rate": share, "judge_prob": prob,
            "pair_accuracy": pair_accuracy(model, pairs, int(tok.pad_token_id)),
            **twin_gaps(model, pairs, int(tok.pad_token_id)),
            "generations": len(texts), "samples": texts[:4]}


@torch.no_grad()
def twin_gaps(model: Any, pairs: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Per movie (pairs 2i: negative request, 2i+1: positive), the chosen-minus-rejected mean
    token log-probability under each request: its size and how the request moves it."""
    gaps = []
    for start in range(0, len(pairs), batch_size):
        batch = pair_collate(pairs[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits
        per_token = sequence_logp(logits, batch["labels"]) \
            / (batch["labels"][:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
        half = len(per_token) // 2
        gaps.append(per_token[:half] - per_token[half:])  # chosen minus rejected
    gap = torch.cat(gaps).view(-1, 2)  # (movies, [negative request, positive request])
    shift = gap[:, 1] + gap[:, 0]  # (pos - neg) under the positive request minus under the negative
    return {"review_gap": float(gap[:, 0].abs().mean()), "request_shift": float(shift.mean()),
            "shift_right": float((shift > 0).float().mean())}

def main() -> None:
    """Score each run folder, and the untuned model of each seed they use."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="petkit train output folders")
    parser.add_argument("--clf-steps", type=int, default=100)
    parser.add_argument("--clf-test", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--untuned", action=argparse.BooleanOptionalAction, default=True,
                        help="score the untuned model of each seed too (default)")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="held-out movies (test) or 20 unused ones (validation)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    clf, clf_tok, info = sentiment_judge(args.clf_steps, args.clf_test)
    print("judge " + json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []
    seeds = {}
    for run in args.runs:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        seeds[run] = int(recipe["train"].get("seed", 0))
    for seed in sorted(set(seeds.values())) if args.untuned else []:
        rows.append({"run": f"untuned (seed {seed})", "seed": seed,
                     **rate(None, seed, (clf, clf_tok), args.new_tokens, args.split)})
        print(json.dumps(rows[-1]), flush=True)
    for run, seed in seeds.items():
        rows.append({"run": str(run), "seed": seed,
                     **rate(run / "adapter", seed, (clf, clf_tok), args.new_tokens,
                          args.split)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"judge": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
