"""Run a grid: skip finished cells, run the rest with a progress display, record every outcome.

A cell that raises is recorded as failed (error and traceback kept) and the grid goes on; a
task that cannot load fails each of its cells the same way. Interrupting (Ctrl-C, kill) loses
at most the cell in flight: re-running the same command resumes.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from petkit.benchmark.cell import run_cell
from petkit.benchmark.pretrain import pretrained_delta, source_task
from petkit.benchmark.spec import BenchSpec, Cell, TaskSpec
from petkit.benchmark.store import ResultStore, is_done
from petkit.benchmark.tasks import CellData, LoadedTask, cell_data, load
from petkit.core.registry import get_method

Echo = Callable[[str], None]


class _Tasks:
    """Loaded tasks and encoded cell data, each built once per run (a load error is kept)."""

    def __init__(self, spec: BenchSpec, out: Path) -> None:
        self.spec, self.out = spec, out
        self.loaded: dict[str, LoadedTask | BaseException] = {}
        self.data: dict[tuple[str, int | None, int], CellData] = {}
        self.inits: dict[str, dict[str, torch.Tensor]] = {}

    def task(self, cell: Cell, spec: TaskSpec | None = None) -> LoadedTask:
        task = spec or cell.task
        if task.name not in self.loaded:
            try:
                self.loaded[task.name] = load(task)
            except Exception as err:  # every cell of the task reports it
                self.loaded[task.name] = err
        found = self.loaded[task.name]
        if isinstance(found, BaseException):
            raise found
        return found

    def init(self, cell: Cell) -> dict[str, torch.Tensor] | None:
        """The arm's pre-trained delta (PVP), trained once per run; None without `pretrain`."""
        if not cell.arm.pretrain:
            return None
        key = f"{cell.task.name}/{cell.arm.name}"
        if key not in self.inits:
            source = self.task(cell, source_task(cell))
            self.inits[key] = pretrained_delta(cell, self.spec, source, self.out / "pretrain")
            self.loaded.pop(source.spec.name)  # its model copy is not needed again
        return self.inits[key]

    def cell_data(self, cell: Cell) -> CellData:
        key = (cell.task.name, cell.size, cell.seed)
        if key not in self.data:
            if len(self.data) > 8:  # seeds are outermost: older entries are done with
                self.data.pop(next(iter(self.data)))
            self.data[key] = cell_data(self.task(cell), cell.size, cell.seed,
                                       self.spec.validation_fraction, self.spec.validation_max,
                                       cell.per_class)
        return self.data[key]


def _identity(cell: Cell, fingerprint: str) -> dict[str, Any]:
    arm = cell.arm
    family = get_method(arm.method).family if arm.method else "baseline"
    return {"key": cell.key, "fingerprint": fingerprint, "task": cell.task.name,
            "model": cell.task.model, "data": cell.task.data, "arm": arm.name, "impl": arm.kind,
            "method": arm.method or arm.name, "family": family, "size": cell.size_label,
            "unit": cell.unit,
            "seed": cell.seed, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else "cpu"}


def _run_one(cell: Cell, spec: BenchSpec, tasks: _Tasks, folder: Path) -> dict[str, Any]:
    record = _identity(cell, spec.fingerprint(cell))
    shutil.rmtree(folder, ignore_errors=True)  # what a killed attempt left
    try:
        record.update(run_cell(cell, spec, tasks.task(cell), tasks.cell_data(cell), folder,
                               tasks.init(cell)))
        record["status"] = "ok"
    except Exception as err:  # the grid goes on; the record says why
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        record.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0])
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def _cell_folder(out: Path, cell: Cell) -> Path:
    safe = cell.key.replace("/", "__").replace(":", "-").replace("=", "")
    return out / "cells" / safe


def _status(path: Path, done: int, total: int, current: str | None, eta_s: float | None) -> None:
    status = {"done": done, "left": total - done, "total": total, "current": current,
              "eta_s": None if eta_s is None else round(eta_s),
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(status, indent=1), encoding="utf-8")


def _line(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"FAILED {record['key']}: {record.get('error')}"
    return (f"{record['key']}: test {record['metric']}={record['test_metric']:.4f} "
            f"({record['trainable_pct']:.3f}% trainable, {record['cell_s']:.0f}s)")


def run_grid(spec: BenchSpec, out: Path, *, retry_failed: bool = False, progress: bool = True,
             shard: tuple[int, int] = (1, 1), echo: Echo = print) -> list[dict[str, Any]]:
    """Run every unfinished cell of `spec` into `out`; return the records of all cells.

    `shard=(i, n)` runs only every n-th cell starting at the i-th (1-based): n processes with
    i = 1..n share one run folder (each appends whole lines to cells.jsonl).
    """
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        return _run(spec, out, retry_failed, progress, shard, echo)
    finally:
        torch.set_num_threads(threads)


def _run(spec: BenchSpec, out: Path, retry_failed: bool, progress: bool, shard: tuple[int, int],
         echo: Echo) -> list[dict[str, Any]]:
    store = ResultStore(out)
    stored = store.load()
    cells = spec.cells()
    prints = {c.key: spec.fingerprint(c) for c in cells}
    index, count = shard
    mine = cells[index - 1::count]
    todo = [c for c in mine if not is_done(stored.get(c.key), prints[c.key], retry_failed)]
    echo(f"bench: {len(mine)} cells{f' (shard {index}/{count})' if count > 1 else ''}, "
         f"{len(mine) - len(todo)} already done, {len(todo)} to run -> {out}")
    tasks = _Tasks(spec, out)

    def current() -> list[dict[str, Any]]:  # records that match the cells as defined now
        return [stored[c.key] for c in cells
                if stored.get(c.key, {}).get("fingerprint") == prints[c.key]]

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="bench", unit="cell",
               disable=not progress, dynamic_ncols=True)
    started, done = time.perf_counter(), len(mine) - len(todo)
    status = out / ("status.json" if count == 1 else f"status-{index}of{count}.json")
    try:
        for i, cell in enumerate(todo):
            eta = (time.perf_counter() - started) / i * (len(todo) - i) if i else None
            _status(status, done, len(mine), cell.key, eta)
            bar.set_postfix_str(cell.key, refresh=True)
            record = _run_one(cell, spec, tasks, _cell_folder(out, cell))
            store.append(record)
            stored.update(store.load())  # this cell, and what other shards have finished since
            done += 1
            bar.update(1)
            (bar.write if progress else echo)(_line(record))
            store.write_csv(current())
        _status(status, done, len(mine), None, 0.0)
    finally:
        bar.close()
    stored.update(store.load())  # other shards' cells too
    return current()
