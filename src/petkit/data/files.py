"""Tasks from a user's own file: .jsonl / .json / .csv / .parquet, read with `datasets`.

The kind is inferred from the columns: text + label -> classification, prompt + completion ->
instruction. String labels map to ints in sorted order of their names; integer labels stay.
"""

from __future__ import annotations

from pathlib import Path

from petkit.core.errors import ConfigError
from petkit.data.task import Task, holdout_split

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_records(path: Path) -> list[dict]:
    """All rows of a data file as dicts."""
    from datasets import Dataset

    if not path.is_file():
        raise ConfigError(f"data file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": Dataset.from_json,
        ".json": Dataset.from_json,
        ".csv": Dataset.from_csv,
        ".parquet": Dataset.from_parquet,
    }
    if suffix not in readers:
        raise ConfigError(f"unsupported data file type {suffix!r}; use one of {SUFFIXES}")
    try:
        dataset = readers[suffix](str(path), keep_in_memory=True)
    except Exception as err:  # datasets raises many types for a malformed file
        raise ConfigError(f"cannot read {str(path)!r} as {suffix}: {err}") from err
    return dataset.to_list()


def _label_names(values: list[object]) -> tuple[tuple[str, ...], dict[object, int]]:
    """Names and value->index mapping: ints keep their value, strings are sorted."""
    if any(v is None for v in values):
        raise ConfigError("label column has empty values")
    if all(isinstance(v, (int, float)) and float(v).is_integer() for v in values):
        ints = sorted({int(v) for v in values})  # type: ignore[arg-type]
        if ints[0] < 0:
            raise ConfigError(f"integer labels must be >= 0, found {ints[0]}")
        names = tuple(str(i) for i in range(ints[-1] + 1))
        return names, {v: int(v) for v in set(values)}  # type: ignore[call-overload]
    names = tuple(sorted({str(v) for v in values}))
    index = {n: i for i, n in enumerate(names)}
    return names, {v: index[str(v)] for v in set(values)}


def _columns_error(path: Path, found: list[str], columns: dict[str, str]) -> ConfigError:
    wanted = (
        f"either {columns['text']!r} + {columns['label']!r} (classification) or "
        f"{columns['prompt']!r} + {columns['completion']!r} (instruction)"
    )
    return ConfigError(f"{str(path)!r} has columns {found}; expected {wanted}")


def _kind(path: Path, rows: list[dict], columns: dict[str, str]) -> str:
    found = list(rows[0]) if rows else []
    if columns["text"] in found and columns["label"] in found:
        return "classification"
    if columns["prompt"] in found and columns["completion"] in found:
        return "instruction"
    raise _columns_error(path, found, columns)


def _convert(row: dict, kind: str, columns: dict[str, str], index: dict[object, int]) -> dict:
    """A user row as petkit's example dict."""
    if kind == "classification":
        return {"text": str(row[columns["text"]]), "label": index[row[columns["label"]]]}
    return {"prompt": str(row[columns["prompt"]]), "completion": str(row[columns["completion"]])}


def load_file_task(
    path: Path,
    test_path: Path | None,
    columns: dict[str, str],
    test_fraction: float,
    seed: int,
) -> Task:
    """A Task from a user file (and optional separate test file)."""
    train_rows = read_records(path)
    if not train_rows:
        raise ConfigError(f"{str(path)!r} has no rows")
    kind = _kind(path, train_rows, columns)
    test_rows = read_records(test_path) if test_path is not None else []
    if test_path is not None and (not test_rows or _kind(test_path, test_rows, columns) != kind):
        raise ConfigError(f"test file {str(test_path)!r} lacks the columns of {str(path)!r}")
    names: tuple[str, ...] = ()
    index: dict[object, int] = {}
    if kind == "classification":
        names, index = _label_names([r[columns["label"]] for r in train_rows + test_rows])
    train = [_convert(r, kind, columns, index) for r in train_rows]
    test = [_convert(r, kind, columns, index) for r in test_rows]
    if test_path is None:
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        train, test = holdout_split(train, max(1, round(test_fraction * len(train))), seed)
    return Task(name=path.stem, kind=kind, train=train, test=test, label_names=names)
