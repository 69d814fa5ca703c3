"""Read the rows of a user's data file: .csv, .jsonl, .json or .parquet, each row with where it is.

The standard library reads CSV and JSON (pyarrow reads parquet), so a
mistake in the file is a one-line `ConfigError` that names the file, the line and the reason:

    reviews.jsonl line 7: not valid JSON (Expecting ',' delimiter at column 31)
    reviews.csv line 12: 3 fields, but the header has 2 (text, label)

Every row comes back as `(where, row)`, e.g. ``("line 12", {"text": ..., "label": ...})``, so later
checks (an empty text, an unknown label) can point at it too.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from petkit.core.errors import ConfigError, MissingPackageError

SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
Row = tuple[str, dict[str, Any]]


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a data file with their location; `ConfigError` if it is missing, unreadable
    or has no rows."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported data file type {suffix or '(none)'!r}; "
                          f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    rows = _read_parquet(path) if suffix == ".parquet" else _read_text_rows(path, suffix)
    if not rows:
        raise ConfigError(f"{path} has no rows")
    return rows


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a data file as dicts (without their locations)."""
    return [row for _, row in read_rows(path)]


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    if not text.strip():
        raise ConfigError(f"{path} is empty")
    return text


def _read_text_rows(path: Path, suffix: str) -> list[Row]:
    text = _text(path)
    if suffix == ".csv":
        return _csv_rows(path, text)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_array_rows(path, text)
    rows = _jsonl_rows(path, text)
    if suffix == ".json" and len(rows) == 1:  # {"text": [...], "label": [...]}: one list per column
        return _columns_to_rows(rows[0][1]) or rows
    return rows


# Tried in order on the header line: the first that splits it into several columns is the file's
# (spreadsheets export ';' where the decimal mark is a comma, and tab-separated text is common).
_DELIMITERS = (",", ";", "\t", "|")


def _delimiter(text: str) -> str:
    header = text[:text.find("\n")] if "\n" in text else text  # the header, not a whole copy
    for delimiter in _DELIMITERS:
        if len(next(csv.reader([header], delimiter=delimiter))) > 1:
            return delimiter
    return ","


def _csv_rows(path: Path, text: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    try:
        header = [name.strip() for name in next(reader)]
        if not all(header) or len(set(header)) != len(header):
            raise ConfigError(f"{path} line 1: the header needs distinct, non-empty column names, "
                              f"got {header}")
        rows: list[Row] = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # a blank line
            if len(values) != len(header):
                raise ConfigError(f"{path} line {reader.line_num}: {len(values)} fields, but the "
                                  f"header has {len(header)} ({', '.join(header)})")
            rows.append((f"line {reader.line_num}", dict(zip(header, values))))
    except csv.Error as err:
        raise ConfigError(f"{path} line {reader.line_num}: not valid CSV ({err})") from err
    if not rows:
        raise ConfigError(f"{path} has a header ({', '.join(header)}) but no rows")
    return rows


def _object(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path} {where}: expected a JSON object {{\"column\": value, ...}}, "
                          f"got {type(value).__name__}")
    return value


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {number}: not valid JSON ({err.msg} at column "
                              f"{err.colno})") from err
        rows.append((f"line {number}", _object(path, f"line {number}", value)))
    return rows


def _json_array_rows(path: Path, text: str) -> list[Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} line {err.lineno}: not valid JSON ({err.msg} at column "
                          f"{err.colno})") from err
    return [(f"item {i}", _object(path, f"item {i}", item)) for i, item in enumerate(items, 1)]


def _columns_to_rows(columns: dict[str, Any]) -> list[Row]:
    """Rows of a {column: [values]} object, or [] when it is not one."""
    lists = list(columns.values())
    if not lists or not all(isinstance(v, list) for v in lists):
        return []
    if len({len(v) for v in lists}) != 1:
        return []
    return [(f"item {i + 1}", dict(zip(columns, values))) for i, values in enumerate(zip(*lists))]


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MissingPackageError("reading .parquet files needs pyarrow: pip install pyarrow") from err
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{path}: cannot read as parquet ({err})") from err
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]
