"""The (seed, projected gradient) log of a zeroth-order run: MeZO's storage trick.

A zeroth-order step is a pure function of its seeds, its projected gradients and its learning
rate, so a run is rebuilt exactly from the initial delta plus this log (a few dozen bytes a step)::

    {"format": "petkit-zo-log", "version": 1, "settings": {...}, "params": [[name, shape, dtype]],
     "exact_restore": true, "init_sha256": "..."}
    {"step": 0, "lr": 0.0001, "seeds": [8734...], "grads": [-0.53]}
    ...

Rows are appended as the run goes (a crash keeps every finished step); a resumed run first drops
the rows at or after the step it resumes from, so the log always matches the adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petkit.core.errors import AdapterLoadError, CheckpointError

FORMAT = "petkit-zo-log"
VERSION = 1
LOG_NAME = "zo_log.jsonl"


def read_log(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header and step rows of a log; `AdapterLoadError` when missing or malformed."""
    file = Path(path)
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"cannot read zeroth-order log {file}: {err}") from err
    if not records or not isinstance(records[0], dict) or records[0].get("format") != FORMAT:
        raise AdapterLoadError(f"{file} is not a petkit zeroth-order log (no {FORMAT!r} header)")
    header, rows = records[0], records[1:]
    if header.get("version") != VERSION:
        raise AdapterLoadError(f"{file}: log version {header.get('version')!r}, expected {VERSION}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("step") != index or \
                len(row.get("seeds", [])) != len(row.get("grads", [])) or "lr" not in row:
            raise AdapterLoadError(f"{file}: row {index + 1} is not step {index} with seeds, "
                                   "grads and lr")
    return header, rows


def _write_atomic(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


class ZOLog:
    """Appends one row per step to a JSONL file; started lazily at the run's first step."""

    def __init__(self, path: str | Path) -> None:
        """Log to `path` (its folder is created)."""
        self.path = Path(path)
        self.started = False

    def start(self, header: dict[str, Any], step: int) -> None:
        """A fresh log at step 0; when resuming at `step`, keep the rows before it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0:
            _write_atomic(self.path, [{"format": FORMAT, "version": VERSION, **header}])
        else:
            try:
                old, rows = read_log(self.path)
            except AdapterLoadError as err:
                raise CheckpointError(f"resuming at step {step} needs the run's log: "
                                      f"{err}") from err
            if len(rows) < step:
                raise CheckpointError(f"{self.path} has {len(rows)} steps, the run resumes at "
                                      f"step {step}")
            _write_atomic(self.path, [old, *rows[:step]])
        self.started = True

    def append(self, step: int, lr: float, seeds: Sequence[int], grads: Sequence[float]) -> None:
        """Record one step (non-finite gradients were already replaced by 0)."""
        assert all(math.isfinite(g) for g in grads)
        row = {"step": step, "lr": lr, "seeds": list(seeds), "grads": list(grads)}
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
