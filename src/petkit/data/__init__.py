"""Task data for petkit: embedded offline tasks, user files, encoding and batching."""

from __future__ import annotations

from pathlib import Path

from petkit.core.errors import ConfigError, did_you_mean
from petkit.data.sealed_split import RecordedSplit, SealedSplitError
from petkit.data.embedded import EMBEDDED_TASKS, load_embedded
from petkit.core.lazy import lazy_exports
from petkit.data.canonical import BAD_ROWS, ReadOptions, is_source
from petkit.data.files import Columns, load_file_task, load_test_file
from petkit.data.formats import FORMATS
from petkit.data.readers import SUFFIXES, read_records, read_rows
from petkit.data.task import Task, split_validation


# Encoding needs torch: loaded on first use, so reading the formats (the CLI's help) stays light.
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(
    ["collate", "encode_classification", "encode_instruction", "label_token_ids"], "petkit.data.encode"))

def is_data_file(name: str) -> bool:
    """True when `name` is not an embedded task but ends like a data file (.csv, .jsonl, ...)."""
    return name not in EMBEDDED_TASKS and Path(name).suffix.lower() in SUFFIXES


def load_task(
    name_or_path: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    test_fraction: float = 0.2,
    seed: int = 0,
    test_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    labels: list[str] | None = None,
    test_path: str | Path | None = None,
    format: str = "auto",
    split: str = "train",
    config: str | None = None,
    bad_rows: str = "error",
) -> Task:
    """An embedded task by name, or a task from a .csv/.jsonl/.json/.parquet training file, a
    saved Hugging Face dataset folder or a hub id (`split`, `config`: `petkit.data.hf`).

    `format` names the row layout (`FORMATS`; "auto" recognises it from the columns);
    `bad_rows` is "error" (malformed rows stop the load, named) or "skip" (named in the notes).

    A training file trains on all its rows. With `test_file` (`test_path` is its old name) every
    row of that file is the test set; without it, a seeded stratified `test_fraction` of the
    training file is held out and `Task.notes` says so. `validation_file` becomes
    `Task.validation`. `labels` are the label names a model was trained with, in index order.
    Every mistake in a file is a one-line `ConfigError` naming file, line and reason.
    """
    test_file = test_file if test_file is not None else test_path
    if name_or_path in EMBEDDED_TASKS:
        if test_file is not None or validation_file is not None:
            raise ConfigError(f"a test or validation file goes with a training file, not with "
                              f"the embedded task {name_or_path!r}")
        return load_embedded(name_or_path, test_fraction, seed)
    if not is_source(name_or_path):
        raise ConfigError(
            f"unknown task {name_or_path!r}{did_you_mean(name_or_path, EMBEDDED_TASKS)}: not an "
            f"embedded task ({', '.join(EMBEDDED_TASKS)}) nor a data file ({', '.join(SUFFIXES)}), "
            f"a saved dataset folder or a hub id (org/name)"
        )
    columns = Columns(text_column, label_column, prompt_column, completion_column)
    options = ReadOptions(columns, format, split, config, bad_rows)
    return load_file_task(name_or_path, test_file=Path(test_file) if test_file is not None else None,
                          validation_file=Path(validation_file) if validation_file else None,
                          labels=labels, test_fraction=test_fraction, seed=seed, options=options)


__all__ = [
    "BAD_ROWS",
    "EMBEDDED_TASKS",
    "FORMATS",
    "ReadOptions",
    "SUFFIXES",
    "Columns",
    "RecordedSplit",
    "SealedSplitError",
    "Task",
    "collate",
    "encode_classification",
    "encode_instruction",
    "is_data_file",
    "is_source",
    "label_token_ids",
    "load_task",
    "load_test_file",
    "read_records",
    "read_rows",
    "split_validation",
]
