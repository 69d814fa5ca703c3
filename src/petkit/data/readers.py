"""Read the rows of a user's data file: .csv, .jsonl, .json or .parquet, each row with where it is.

The standard library reads CSV and JSON (pyarrow reads parquet), so a
mistake in the file is a one-line `ConfigError` that names the file, the line and the reason:

    reviews.jsonl line 7: not valid JSON (Expecting ',' delimiter at column 31)
    reviews.csv line 12: 3 fields, but the header has 2 (text, label)

Every row comes back as `(where, row)`, e.g. ``("line 12", {"text": ..., "label": ...})``, so later
checks (an empty text, an unknown label) can point at it too.

Sizes are checked before parsing (`ReadLimits`, generous defaults; replace `LIMITS` or pass
`limits=` to change them): the file's size from `stat`, each CSV/JSONL line while it is read
(a 500 MB line is refused after reading `max_row_bytes` of it), a .json document's size, and a
parquet file's row groups from its footer (bytes per row) before any column is decoded.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petkit.core.disk import format_bytes
from petkit.core.errors import ConfigError, MissingPackageError

SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
Row = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class ReadLimits:
    """Size caps checked before parsing a data file."""

    max_file_bytes: int = 8 << 30  # any data file
    max_row_bytes: int = 64 << 20  # one CSV/JSONL line, one parquet row (on average per group)
    max_document_bytes: int = 1 << 30  # a .json file, parsed as one document


LIMITS = ReadLimits()


def read_rows(path: str | Path, limits: ReadLimits | None = None) -> list[Row]:
    """All rows of a data file with their location; `ConfigError` if it is missing, unreadable,
    over a size cap or has no rows."""
    path, limits = Path(path), limits or LIMITS
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported data file type {suffix or '(none)'!r}; "
                          f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    cap = limits.max_document_bytes if suffix == ".json" else limits.max_file_bytes
    _check_size(path, path.stat().st_size, cap, "the file")
    rows = _read_parquet(path, limits) if suffix == ".parquet" else _read_text_rows(path, suffix, limits)
    if not rows:
        raise ConfigError(f"{path} has no rows")
    return rows


def _check_size(path: Path, size: int, cap: int, what: str) -> None:
    if size > cap:
        raise ConfigError(f"{path}: {what} is {format_bytes(size)}, over the {format_bytes(cap)} "
                          "petkit reads (refused before parsing; petkit.data.readers.LIMITS sets it)")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a data file as dicts (without their locations)."""
    return [row for _, row in read_rows(path)]


def _raw(path: Path, suffix: str, limits: ReadLimits) -> bytes:
    """The file's bytes, each line checked against `max_row_bytes` as it is read (a .json
    document, often one line, is bounded as a whole instead)."""
    if suffix == ".json":
        return path.read_bytes()
    lines = []
    with open(path, "rb") as fh:
        while line := fh.readline(limits.max_row_bytes + 1):
            if len(line) > limits.max_row_bytes and not line.endswith(b"\n"):
                raise ConfigError(f"{path} line {len(lines) + 1} is longer than "
                                  f"{format_bytes(limits.max_row_bytes)}: refused before parsing "
                                  "(petkit.data.readers.LIMITS sets the cap)")
            lines.append(line)
    return b"".join(lines)


def _text(path: Path, suffix: str, limits: ReadLimits) -> str:
    raw = _raw(path, suffix, limits)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    if not text.strip():
        raise ConfigError(f"{path} is empty")
    return text


def _read_text_rows(path: Path, suffix: str, limits: ReadLimits) -> list[Row]:
    text = _text(path, suffix, limits)
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
    try:
        delimiter = _delimiter(text)
    except csv.Error as err:
        raise ConfigError(f"{path} line 1: not valid CSV ({err})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
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
    except (csv.Error, StopIteration) as err:
        raise ConfigError(f"{path} line {reader.line_num}: not valid CSV ({err or 'no header'})") from None
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
        value = _json(path, line, number)
        rows.append((f"line {number}", _object(path, f"line {number}", value)))
    return rows


def _json(path: Path, text: str, first_line: int = 1) -> Any:
    """`json.loads` with every failure a `ConfigError` naming the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} line {first_line + err.lineno - 1}: not valid JSON ({err.msg} "
                          f"at column {err.colno})") from None
    except RecursionError:
        raise ConfigError(f"{path} line {first_line}: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path} line {first_line}: not usable JSON ({err})") from None


def _json_array_rows(path: Path, text: str) -> list[Row]:
    items = _json(path, text)
    if not isinstance(items, list):
        raise ConfigError(f"{path} line 1: expected a JSON array of objects, got {type(items).__name__}")
    return [(f"item {i}", _object(path, f"item {i}", item)) for i, item in enumerate(items, 1)]


def _columns_to_rows(columns: dict[str, Any]) -> list[Row]:
    """Rows of a {column: [values]} object, or [] when it is not one."""
    lists = list(columns.values())
    if not lists or not all(isinstance(v, list) for v in lists):
        return []
    if len({len(v) for v in lists}) != 1:
        return []
    return [(f"item {i + 1}", dict(zip(columns, values))) for i, values in enumerate(zip(*lists))]


def _read_parquet(path: Path, limits: ReadLimits) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MissingPackageError("reading .parquet files needs pyarrow: pip install pyarrow") from err
    try:
        meta = pq.ParquetFile(path).metadata
        first = 1
        for g in range(meta.num_row_groups):  # declared sizes, from the footer only
            group = meta.row_group(g)
            _check_size(path, group.total_byte_size // max(group.num_rows, 1), limits.max_row_bytes,
                        f"row {first} (row group {g}: {group.num_rows} rows, "
                        f"{format_bytes(group.total_byte_size)}) on average")
            first += group.num_rows
        rows = pq.read_table(path).to_pylist()
    except ConfigError:
        raise
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{path}: cannot read as parquet ({' '.join(str(err).split())[:300]})") from None
    return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
