"""The `Task` record and the seeded, stratified splits that every task goes through.

Fair protocol: the test split is carved once (fixed seed) and never used for selection; validation
is carved from train with `split_validation`. Classification splits are stratified by label;
instruction, preference and reference splits are grouped by prompt, chat splits by their first
user turn, so a held-out prompt never appears in train.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from petkit.core.errors import ConfigError
from petkit.data.formats import KINDS


@dataclass(frozen=True)
class Task:
    """A train/test pair of example lists plus what a model needs to read them.

    classification examples: {"text": str, "label": int}; the other kinds (instruction, chat,
    preference, reference) hold the canonical rows of `formats.py`; `format` names the format
    the rows were recognised as ("" for an embedded task built in code) and `format_note` says
    so with the columns used: the first line a run prints.
    `template` and `label_words` form the verbaliser used when a decoder classifies by next token.
    `validation` is a user's own validation file ([] otherwise); `notes` say where each split
    came from and how big it is ("test: 60 rows held out of train.csv (20%, ...)").
    """

    name: str
    kind: str
    train: list[dict] = field(repr=False)
    test: list[dict] = field(repr=False)
    label_names: tuple[str, ...] = ()
    template: str = "{text}"
    label_words: tuple[str, ...] = ()
    validation: list[dict] = field(default_factory=list, repr=False)
    notes: tuple[str, ...] = ()
    format: str = ""
    format_note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Task.kind must be one of {KINDS}, got {self.kind!r}")
        if "{text}" not in self.template:
            raise ConfigError(f"Task.template must contain '{{text}}', got {self.template!r}")
        if self.kind == "classification" and not self.label_words:
            object.__setattr__(self, "label_words", tuple(f" {n}" for n in self.label_names))
        if self.label_words and len(self.label_words) != len(self.label_names):
            raise ConfigError(
                f"Task.label_words has {len(self.label_words)} entries for "
                f"{len(self.label_names)} labels"
            )

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for instruction tasks)."""
        return len(self.label_names)


def _quotas(sizes: dict[object, int], n_holdout: int) -> dict[object, int]:
    """Split n_holdout over groups proportionally to size (largest remainder, exact total)."""
    total = sum(sizes.values())
    exact = {k: n_holdout * s / total for k, s in sizes.items()}
    quotas = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (exact[k] - quotas[k], str(k)), reverse=True)
    for k in by_remainder[: n_holdout - sum(quotas.values())]:
        quotas[k] += 1
    return quotas


def _prompt_key(example: dict) -> str:
    """What a row is asked: its prompt (text or messages), or a chat's first user turn."""
    if "prompt" in example:
        return str(example["prompt"])
    return next((m["content"] for m in example["messages"] if m["role"] == "user"), "")


def _holdout_indices(examples: list[dict], order: list[int], n_holdout: int) -> set[int]:
    """Held-out indices taken in `order`: stratified by label, grouped by prompt, else first n."""
    first = examples[0]
    if "label" in first:
        by_label: dict[object, list[int]] = defaultdict(list)
        for i in order:
            by_label[examples[i]["label"]].append(i)
        quotas = _quotas({k: len(v) for k, v in by_label.items()}, n_holdout)
        return {i for k, idx in by_label.items() for i in idx[: quotas[k]]}
    if "prompt" in first or "messages" in first:
        groups: dict[str, list[int]] = defaultdict(list)
        for i in order:
            groups[_prompt_key(examples[i])].append(i)
        picked: set[int] = set()
        for idx in groups.values():  # groups come in shuffled order of first appearance
            if len(picked) >= n_holdout:
                break
            picked.update(idx)
        return picked
    return set(order[:n_holdout])


def holdout_split(
    examples: list[dict], n_holdout: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """(rest, held_out) with about n_holdout held out; both in one seeded shuffled order."""
    if not 0 < n_holdout < len(examples):
        raise ConfigError(
            f"cannot hold out {n_holdout} of {len(examples)} examples "
            f"(need 0 < n < {len(examples)})"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = _holdout_indices(examples, order, n_holdout)
    rest = [examples[i] for i in order if i not in held]
    return rest, [examples[i] for i in order if i in held]


def split_validation(
    examples: list[dict], fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, validation): validation carved from train, stratified by label (fair protocol)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction!r}")
    n_holdout = max(1, round(fraction * len(examples)))
    return holdout_split(examples, n_holdout, seed)
