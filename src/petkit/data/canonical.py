"""One source of rows (a data file, a saved dataset, a hub id) -> its recognised format and its
canonical rows (formats.py), with every malformed row counted and named.

Malformed rows (a missing role, an empty assistant turn, content that is not text, chosen ==
rejected, an empty text, ...) are never dropped silently. With `--bad-rows error` (the default)
they stop the run before any model loads: one row is `file line 7: <reason>`, several are
counted and the first ones listed. With `--bad-rows skip` the run trains on the others and its
first lines say how many rows were skipped, with their lines and reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from petkit.core.errors import ConfigError
from petkit.data.formats import Columns, Detected, detect
from petkit.data.row_values import BadRow
from petkit.data.readers import Row, read_rows

BAD_ROWS = ("error", "skip")
SHOWN = 5  # malformed rows listed by name in a message


@dataclass(frozen=True)
class ReadOptions:
    """How a source is read: column names, `--format`, `--data-split`, `--data-config`,
    `--bad-rows`."""

    columns: Columns = Columns()
    format: str = "auto"
    split: str = "train"
    config: str | None = None
    bad_rows: str = "error"

    def __post_init__(self) -> None:
        if self.bad_rows not in BAD_ROWS:
            raise ConfigError(f"--bad-rows must be one of {', '.join(BAD_ROWS)}, "
                              f"got {self.bad_rows!r}")


@dataclass
class Canonical:
    """A source's canonical rows with their locations, its format, and what the run should say."""

    name: str
    rows: list[tuple[str, dict]]
    detected: Detected
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """The format's kind (classification, instruction, chat, preference, reference)."""
        return self.detected.format.kind


def _found(rows: list[Row]) -> list[str]:
    """Every column any row has, in order of first appearance."""
    return list(dict.fromkeys(k for _, row in rows for k in row))


def _listed(problems: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{where}: {reason}" for where, reason in problems[:SHOWN])
    more = len(problems) - SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


def _bad_rows(name: str, problems: list[tuple[str, str]], total: int, policy: str) -> str | None:
    """Raise for `error` (or when nothing is left); the note for `skip`."""
    if not problems:
        return None
    if policy == "skip" and len(problems) < total:
        return (f"skipped {len(problems):,} malformed row(s) of {total:,} in {name} "
                f"(--bad-rows skip): {_listed(problems)}")
    if len(problems) == 1:
        where, reason = problems[0]
        raise ConfigError(f"{name} {where}: {reason}")
    rest = "" if len(problems) == total else \
        f"; fix them, or --bad-rows skip trains on the other {total - len(problems):,}"
    raise ConfigError(f"{name}: {len(problems):,} of {total:,} rows are malformed: "
                      f"{_listed(problems)}{rest}")


def canonical(name: str, rows: list[Row], options: ReadOptions) -> Canonical:
    """Detect the format of `rows` (or take `--format`), read each into its canonical row."""
    detected = detect(str(name), _found(rows), options.columns, options.format)
    out: list[tuple[str, dict]] = []
    problems: list[tuple[str, str]] = []
    for where, row in rows:
        try:
            out.append((where, detected.format.read(row, detected.columns)))
        except BadRow as err:
            problems.append((where, str(err)))
    note = _bad_rows(str(name), problems, len(rows), options.bad_rows)
    return Canonical(str(name), out, detected, [note] if note else [])


def is_source(name: str) -> bool:
    """A data file, a saved dataset folder or a hub id (not an embedded task)."""
    from petkit.data.hf import is_dataset_folder, is_hub_id
    from petkit.data.readers import SUFFIXES

    return Path(name).suffix.lower() in SUFFIXES or is_dataset_folder(name) or is_hub_id(name)


def read_source(name: str | Path, options: ReadOptions) -> tuple[Canonical, Canonical | None]:
    """The training rows of a file / dataset folder / hub id, and a dataset's own test split."""
    path = Path(name)
    from petkit.data.readers import SUFFIXES

    if path.suffix.lower() in SUFFIXES and not path.is_dir():
        return canonical(str(path), read_rows(path), options), None
    from petkit.data.hf import read_dataset

    data = read_dataset(str(name), options.split, options.config)
    train = canonical(str(name), data.train, options)
    test = None if data.test is None else canonical(str(name), data.test, options)
    return train, test


def describe(source: Canonical) -> str:
    """The run's first line about a source: "format: messages (chat; columns: messages) in x"."""
    return f"format: {source.detected.describe()} in {source.name}"
