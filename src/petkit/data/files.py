"""Tasks from a user's own data: a training source, and optionally a validation and a test file.

A source is a data file (.csv .jsonl .json .parquet), a saved Hugging Face dataset folder or a
hub id; its format (text-label, prompt-completion, alpaca, messages, sharegpt, preference,
reference: `formats.py`) is recognised from its columns or named with `--format`, and the run's
first lines say which format and columns were used. Labels may be words or integers: words map
to indices in sorted order, integers keep their value; with `labels` given (the label names a
run was trained with) values map to those names and any other value is an error naming the row.

A training source trains on all its rows. Without a test file, a dataset's own `test` split is
the test set, else a stratified (by label) or grouped (by prompt) test split of `test_fraction`
is held out of it, and `Task.notes` says so with its size. Every mistake (a missing column, an
empty value, one class only, a label the training file never had, malformed rows: see
`canonical.py`) is a one-line `ConfigError` in the file's terms, raised before any model loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from petkit.core.errors import ConfigError
from petkit.data.canonical import Canonical, ReadOptions, canonical, describe, read_source
from petkit.data.formats import Columns
from petkit.data.row_values import label_key
from petkit.data.readers import read_rows
from petkit.data.task import Task, holdout_split

__all__ = ["Columns", "ReadOptions", "label_key", "load_file_task", "load_test_file"]


def _is_int(key: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", key) is not None


MAX_CLASSES = 100_000  # integer labels name classes 0..max: a larger one is a mistake in the file


def _check_int_labels(splits: list[Canonical]) -> None:
    """Integer labels index classes 0..max; name the row of one that would make too many."""
    for split in splits:
        for where, row in split.rows:
            key = row["label"]
            if len(key) > 6 or not 0 <= int(key) < MAX_CLASSES:
                raise ConfigError(f"{split.name} {where}: {_label_column(split)!r} is {key[:20]!r}: "
                                  f"integer labels number classes 0..{MAX_CLASSES - 1}")


def label_names(keys: set[str]) -> tuple[str, ...]:
    """Names in index order: integers keep their value (0..max), words are sorted."""
    if keys and all(_is_int(k) for k in keys):
        values = sorted(int(k) for k in keys)
        if values[0] < 0:
            raise ConfigError(f"integer labels must be >= 0, found {values[0]}")
        return tuple(str(i) for i in range(values[-1] + 1))
    return tuple(sorted(keys))


def _columns(source: Canonical) -> str:
    return ", ".join(source.detected.columns.values())


def _label_column(source: Canonical) -> str:
    return source.detected.columns["label"]


def _label_index(splits: list[Canonical], labels: list[str] | tuple[str, ...] | None
                 ) -> tuple[tuple[str, ...], dict[str, int]]:
    """Label names and key -> index; a value outside given `labels` names its row."""
    if labels is None:
        keys = {row["label"] for s in splits for _, row in s.rows}
        if keys and all(_is_int(k) for k in keys):
            _check_int_labels(splits)
        names = label_names(keys)
        return names, {n: i for i, n in enumerate(names)}
    names = tuple(str(n) for n in labels)
    index = {n: i for i, n in enumerate(names)}
    for split in splits:
        for where, row in split.rows:
            key = row["label"]
            if key not in index and not (_is_int(key) and 0 <= int(key) < len(names)):
                raise ConfigError(f"{split.name} {where}: {_label_column(split)!r} is {key!r}, not "
                                  f"one of the labels the model was trained on ({', '.join(names)})")
    return names, index


def _check_labels(train: Canonical, others: list[Canonical]) -> None:
    """At least two classes in training; no label in a validation/test file that training lacks
    (others=[] when the label names are given: `_label_index` checks against those)."""
    seen = {row["label"] for _, row in train.rows}
    if len(seen) < 2:
        raise ConfigError(f"{train.name}: every row has {_label_column(train)!r} = "
                          f"{next(iter(seen))!r}; classification needs at least two different labels")
    for split in others:
        for where, row in split.rows:
            if row["label"] not in seen:
                raise ConfigError(f"{split.name} {where}: {_label_column(split)!r} is "
                                  f"{row['label']!r}, which no row of {train.name} has "
                                  f"({', '.join(sorted(seen))})")


def _examples(split: Canonical, index: dict[str, int]) -> list[dict]:
    if split.kind != "classification":
        return [row for _, row in split.rows]
    return [{"text": row["text"], "label": index[row["label"]] if row["label"] in index
             else int(row["label"])} for _, row in split.rows]


def _same_kind(split: Canonical, train: Canonical) -> Canonical:
    if split.kind != train.kind:
        raise ConfigError(f"{split.name} is {split.kind} data ({_columns(split)}) but the "
                          f"training data is {train.kind} ({_columns(train)})")
    return split


def _file(path: Path, options: ReadOptions) -> Canonical:
    return canonical(str(path), read_rows(path), options)


def load_file_task(path: str | Path, columns: Columns | None = None, *,
                   test_file: Path | None = None, validation_file: Path | None = None,
                   labels: list[str] | None = None, test_fraction: float = 0.2, seed: int = 0,
                   options: ReadOptions | None = None) -> Task:
    """A Task from a training source and optional validation/test files (see the module doc)."""
    options = options or ReadOptions(columns=columns or Columns())
    train, own_test = read_source(path, options)
    val = _same_kind(_file(validation_file, options), train) if validation_file else None
    test = _same_kind(_file(test_file, options), train) if test_file else None
    test = test or own_test
    splits = [s for s in (train, val, test) if s is not None]
    names: tuple[str, ...] = ()
    index: dict[str, int] = {}
    if train.kind == "classification":
        _check_labels(train, splits[1:] if labels is None else [])
        names, index = _label_index(splits, labels)
    train_ex = _examples(train, index)
    notes = [*(n for s in splits for n in s.notes),
             f"train: {path}, all {len(train_ex):,} rows"]
    validation = _examples(val, index) if val is not None else []
    if val is not None:
        notes.append(f"validation: {validation_file}, all {len(validation):,} rows")
    if test is not None:
        test_ex = _examples(test, index)
        where = test_file if test_file else f"the dataset's test split of {path}"
        notes.append(f"test: {where}, all {len(test_ex):,} rows")
    else:
        train_ex, test_ex = _hold_out_test(path, train_ex, test_fraction, seed)
        notes[-1] = f"train: {path}, {len(train_ex):,} of its {len(train_ex) + len(test_ex):,} rows"
        how = "stratified" if train.kind == "classification" else "a prompt's rows together"
        notes.append(f"test: {len(test_ex):,} rows held out of {path} ({test_fraction:.0%}, "
                     f"{how}, seed {seed}); give a test file (--test-file) to use your own")
    return Task(name=Path(str(path)).stem, kind=train.kind, train=train_ex, test=test_ex,
                label_names=names, validation=validation, notes=tuple(notes),
                format=train.detected.format.name, format_note=describe(train))


def _hold_out_test(path: str | Path, examples: list[dict], fraction: float,
                   seed: int) -> tuple[list[dict], list[dict]]:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {fraction!r}")
    n_test = max(1, round(fraction * len(examples)))
    if n_test >= len(examples):
        raise ConfigError(f"{path} has {len(examples)} row(s): too few to hold out a test set; "
                          f"add rows or give a test file (--test-file)")
    rest, test = holdout_split(examples, n_test, seed)
    if not rest:  # rows are held out by prompt: one prompt everywhere takes them all
        raise ConfigError(f"{path}: holding out a test set left no training rows (its rows share "
                          f"one prompt); give a test file (--test-file)")
    return rest, test


def load_test_file(path: Path, columns: Columns | None = None, labels: list[str] | None = None,
                   options: ReadOptions | None = None) -> Task:
    """A Task whose test split is every row of `path` (no training rows): for scoring a file."""
    options = options or ReadOptions(columns=columns or Columns())
    split = _file(path, options)
    names: tuple[str, ...] = ()
    index: dict[str, int] = {}
    if split.kind == "classification":
        names, index = _label_index([split], labels)
    test = _examples(split, index)
    return Task(name=path.stem, kind=split.kind, train=[], test=test, label_names=names,
                notes=(*split.notes, f"test: {path}, all {len(test):,} rows"),
                format=split.detected.format.name, format_note=describe(split))
