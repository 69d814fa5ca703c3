"""Task data for petkit: embedded offline tasks, user files, encoding and batching."""

from __future__ import annotations

from pathlib import Path

from petkit.core.errors import ConfigError
from petkit.data.access import RecordedSplit, SealedSplitError
from petkit.data.embedded import EMBEDDED_TASKS, load_embedded
from petkit.data.encode import collate, encode_classification, encode_instruction, label_token_ids
from petkit.data.files import SUFFIXES, load_file_task
from petkit.data.task import Task, split_validation


def load_task(
    name_or_path: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    test_fraction: float = 0.2,
    seed: int = 0,
    test_path: str | None = None,
) -> Task:
    """An embedded task by name, or a task from a .jsonl/.json/.csv/.parquet file.

    Without `test_path`, a seeded stratified test split of `test_fraction` is carved from the file
    (embedded rotten-tomatoes caps its test split at 2000 examples).
    """
    if name_or_path in EMBEDDED_TASKS:
        return load_embedded(name_or_path, test_fraction, seed)
    path = Path(name_or_path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(
            f"unknown task {name_or_path!r}: not an embedded task ({', '.join(EMBEDDED_TASKS)}) "
            f"nor a data file ({', '.join(SUFFIXES)})"
        )
    columns = {
        "text": text_column,
        "label": label_column,
        "prompt": prompt_column,
        "completion": completion_column,
    }
    test = Path(test_path) if test_path is not None else None
    return load_file_task(path, test, columns, test_fraction, seed)


__all__ = [
    "EMBEDDED_TASKS",
    "RecordedSplit",
    "SealedSplitError",
    "Task",
    "collate",
    "encode_classification",
    "encode_instruction",
    "label_token_ids",
    "load_task",
    "split_validation",
]
