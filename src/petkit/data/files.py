"""Tasks from a user's own files: a training file, and optionally a validation and a test file.

The kind comes from the columns: text + label -> classification, prompt + completion ->
instruction (the column names are options). Labels may be words or integers: words map to
indices in sorted order, integers keep their value; with `labels` given (the label names a run was
trained with) values map to those names and any other value is an error naming the row.

A training file trains on all its rows. Without a test file, a stratified test split of
`test_fraction` is held out of it, and `Task.notes` says so with its size. Every mistake (a
missing column, an empty value, one class only, a label the training file never had) is a
one-line `ConfigError` in the file's terms, raised before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petkit.core.errors import ConfigError
from petkit.data.readers import Row, read_rows
from petkit.data.task import Task, holdout_split


@dataclass(frozen=True)
class Columns:
    """Which column of the user's file holds each field."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"

    def fields(self, kind: str) -> tuple[str, str]:
        """The two columns a task of `kind` reads."""
        return (self.text, self.label) if kind == "classification" else (self.prompt, self.completion)


def infer_kind(path: Path, rows: list[Row], columns: Columns) -> str:
    """classification or instruction, from the first row's columns; else a `ConfigError` naming
    the columns the file has."""
    found = list(rows[0][1])
    for kind in ("classification", "instruction"):
        if all(c in found for c in columns.fields(kind)):
            return kind
    wanted = [c for kind in ("classification", "instruction") for c in columns.fields(kind)
              if c in found]
    kind = "instruction" if wanted and wanted[0] in columns.fields("instruction") else "classification"
    missing = [c for c in columns.fields(kind) if c not in found]
    raise ConfigError(f"{path} has no column {' or '.join(repr(m) for m in missing)} (its "
                      f"columns: {', '.join(found)}); name yours with --text-column/--label-column "
                      f"(classification) or --prompt-column/--completion-column (instruction)")


def label_key(value: Any) -> str | None:
    """A label value as text: 1, 1.0 and "1" are all "1"; None or blank is None."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _is_int(key: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", key) is not None


def label_names(keys: set[str]) -> tuple[str, ...]:
    """Names in index order: integers keep their value (0..max), words are sorted."""
    if keys and all(_is_int(k) for k in keys):
        values = sorted(int(k) for k in keys)
        if values[0] < 0:
            raise ConfigError(f"integer labels must be >= 0, found {values[0]}")
        return tuple(str(i) for i in range(values[-1] + 1))
    return tuple(sorted(keys))


def _fields(path: Path, rows: list[Row], kind: str, columns: Columns) -> list[tuple[str, str, str]]:
    """(where, first, second) per row, the two task fields as text; blank values are errors."""
    first, second = columns.fields(kind)
    out = []
    for where, row in rows:
        for column in (first, second):
            if column not in row:
                raise ConfigError(f"{path} {where}: no {column!r} (it has: {', '.join(row)})")
        a = str(row[first]).strip() if row[first] is not None else ""
        b = label_key(row[second]) if kind == "classification" else \
            (str(row[second]) if row[second] is not None else "")
        for column, value in ((first, a), (second, b)):
            if not value or not value.strip():
                raise ConfigError(f"{path} {where}: empty {column!r}")
        out.append((where, a, b))  # type: ignore[arg-type]
    return out


@dataclass
class _Split:
    path: Path
    rows: list[tuple[str, str, str]]


MAX_CLASSES = 100_000  # integer labels name classes 0..max: a larger one is a mistake in the file


def _check_int_labels(splits: list[_Split], column: str) -> None:
    """Integer labels index classes 0..max; name the row of one that would make too many."""
    for split in splits:
        for where, _, key in split.rows:
            if len(key) > 6 or not 0 <= int(key) < MAX_CLASSES:
                raise ConfigError(f"{split.path} {where}: {column!r} is {key[:20]!r}: integer labels "
                                  f"number classes 0..{MAX_CLASSES - 1}")


def _label_index(splits: list[_Split], labels: list[str] | tuple[str, ...] | None,
                 column: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """Label names and key -> index; a value outside given `labels` names its row."""
    if labels is None:
        keys = {key for s in splits for _, _, key in s.rows}
        if keys and all(_is_int(k) for k in keys):
            _check_int_labels(splits, column)
        names = label_names(keys)
        return names, {n: i for i, n in enumerate(names)}
    names = tuple(str(n) for n in labels)
    index = {n: i for i, n in enumerate(names)}
    for split in splits:
        for where, _, key in split.rows:
            if key not in index and not (_is_int(key) and 0 <= int(key) < len(names)):
                raise ConfigError(f"{split.path} {where}: {column!r} is {key!r}, not one of the "
                                  f"labels the model was trained on ({', '.join(names)})")
    return names, index


def _check_labels(train: _Split, others: list[_Split], column: str) -> None:
    """At least two classes in training; no label in a validation/test file that training lacks
    (others=[] when the label names are given: `_label_index` checks against those)."""
    seen = {key for _, _, key in train.rows}
    if len(seen) < 2:
        raise ConfigError(f"{train.path}: every row has {column!r} = {next(iter(seen))!r}; "
                          f"classification needs at least two different labels")
    for split in others:
        for where, _, key in split.rows:
            if key not in seen:
                raise ConfigError(f"{split.path} {where}: {column!r} is {key!r}, which no row of "
                                  f"{train.path} has ({', '.join(sorted(seen))})")


def _examples(split: _Split, kind: str, index: dict[str, int]) -> list[dict]:
    if kind == "instruction":
        return [{"prompt": a, "completion": b} for _, a, b in split.rows]
    return [{"text": a, "label": index[b] if b in index else int(b)} for _, a, b in split.rows]


def _split(path: Path, kind: str | None, columns: Columns) -> tuple[_Split, str]:
    rows = read_rows(path)
    found = infer_kind(path, rows, columns)
    if kind is not None and found != kind:
        raise ConfigError(f"{path} is {found} data ({', '.join(columns.fields(found))}) but the "
                          f"training data is {kind} ({', '.join(columns.fields(kind))})")
    return _Split(path, _fields(path, rows, found, columns)), found


def load_file_task(path: Path, columns: Columns, *, test_file: Path | None = None,
                   validation_file: Path | None = None, labels: list[str] | None = None,
                   test_fraction: float = 0.2, seed: int = 0) -> Task:
    """A Task from a training file and optional validation/test files (see the module doc)."""
    train, kind = _split(path, None, columns)
    others = [_split(p, kind, columns)[0] for p in (validation_file, test_file) if p is not None]
    names: tuple[str, ...] = ()
    index: dict[str, int] = {}
    if kind == "classification":
        _check_labels(train, others if labels is None else [], columns.label)
        names, index = _label_index([train, *others], labels, columns.label)
    examples = {s.path: _examples(s, kind, index) for s in [train, *others]}
    train_ex = examples[path]
    notes = [f"train: {path}, all {len(train_ex):,} rows"]
    validation = examples[validation_file] if validation_file is not None else []
    if validation_file is not None:
        notes.append(f"validation: {validation_file}, all {len(validation):,} rows")
    if test_file is not None:
        test = examples[test_file]
        notes.append(f"test: {test_file}, all {len(test):,} rows")
    else:
        train_ex, test = _hold_out_test(path, train_ex, test_fraction, seed)
        notes[0] = f"train: {path}, {len(train_ex):,} of its {len(train_ex) + len(test):,} rows"
        how = "stratified" if kind == "classification" else "a prompt's rows together"
        notes.append(f"test: {len(test):,} rows held out of {path} ({test_fraction:.0%}, "
                     f"{how}, seed {seed}); give a test file (--test-file) to use your own")
    return Task(name=path.stem, kind=kind, train=train_ex, test=test, label_names=names,
                validation=validation, notes=tuple(notes))


def _hold_out_test(path: Path, examples: list[dict], fraction: float,
                   seed: int) -> tuple[list[dict], list[dict]]:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {fraction!r}")
    n_test = max(1, round(fraction * len(examples)))
    if n_test >= len(examples):
        raise ConfigError(f"{path} has {len(examples)} row(s): too few to hold out a test set; "
                          f"add rows or give a test file (--test-file)")
    rest, test = holdout_split(examples, n_test, seed)
    if not rest:  # instruction rows are held out by prompt: one prompt everywhere takes them all
        raise ConfigError(f"{path}: holding out a test set left no training rows (its rows share "
                          f"one prompt); give a test file (--test-file)")
    return rest, test


def load_test_file(path: Path, columns: Columns, labels: list[str] | None = None) -> Task:
    """A Task whose test split is every row of `path` (no training rows): for scoring a file."""
    split, kind = _split(path, None, columns)
    names: tuple[str, ...] = ()
    index: dict[str, int] = {}
    if kind == "classification":
        names, index = _label_index([split], labels, columns.label)
    test = _examples(split, kind, index)
    return Task(name=path.stem, kind=kind, train=[], test=test, label_names=names,
                notes=(f"test: {path}, all {len(test):,} rows",))
