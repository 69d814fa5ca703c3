"""The grid's results on disk: one JSON line per finished cell, appended and synced.

`cells.jsonl` is the source of truth and the resume point: a line is written only when a cell
has finished (status "ok") or failed (status "failed", with its error). A run killed mid-cell
leaves no line for that cell, so a restart runs it again; a half-written last line is ignored.
`cells.csv` is rewritten from it after every cell.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

COLUMNS = ("key", "status", "task", "model", "data", "arm", "impl", "method", "family", "size", "unit",
           "seed", "n_train", "n_val", "n_test", "metric", "test_metric", "test_loss",
           "best_val_metric", "best_step", "steps", "trainable_params", "base_params",
           "trainable_pct", "peak_mem_mb", "train_s", "s_per_step", "cpu_s_per_step", "adapter_bytes", "model_bytes", "cell_s",
           "device", "fingerprint", "finished", "error")


class ResultStore:
    """Append-only record of finished cells in `folder/cells.jsonl`."""

    def __init__(self, folder: Path) -> None:
        """Store under `folder` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "cells.jsonl"
        self.csv_path = folder / "cells.csv"

    def load(self) -> dict[str, dict[str, Any]]:
        """The latest record of each cell key (lines that do not parse are skipped)."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the tail of a run killed while writing
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably (flushed and fsynced before returning)."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_csv(self, records: list[dict[str, Any]]) -> Path:
        """All `records` as CSV (written to a temp file and renamed into place)."""
        tmp = self.csv_path.with_suffix(f".csv.{os.getpid()}.tmp")  # shards write it too
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for record in records:
                writer.writerow({k: record.get(k, "") for k in COLUMNS})
        os.replace(tmp, self.csv_path)
        return self.csv_path


def is_done(record: dict[str, Any] | None, fingerprint: str, retry_failed: bool) -> bool:
    """Whether a stored record finishes the cell as it is defined now."""
    if record is None or record.get("fingerprint") != fingerprint:
        return False
    return record.get("status") == "ok" or (record.get("status") == "failed" and not retry_failed)
