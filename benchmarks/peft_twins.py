"""PEFT's tuners side by side on a task: each method of benchmarks/peft_twins.yaml against PEFT's
implementation of it (the harness's `kind: peft` arm), one harness grid per method so that a run
cut short leaves whole methods (3 seeds each) rather than one seed of every method.

    nice -n 10 python benchmarks/peft_twins.py run [vera,loha,...]   # runs/bench-peft-twins/<method>/
    python benchmarks/peft_twins.py table      # cells kept in docs/peft_twins.json; the table in docs/methods.md

Within a method's grid the cells alternate petkit, PEFT, petkit, PEFT (seed by seed), so load on
the machine falls on both arms alike; the step-time ratio is petkit / PEFT of the mean wall
seconds per step over the seeds of that one run. `table` keeps each method's cells in
docs/peft_twins.json (a method run again replaces its earlier cells), so the table spans runs.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "peft_twins.yaml"
OUT = ROOT / "runs" / "bench-peft-twins"


def _grid() -> dict:
    return yaml.safe_load(GRID.read_text(encoding="utf-8"))


def _method(entry: dict | str) -> str:
    return entry if isinstance(entry, str) else entry["name"]


def run(only: list[str] | None = None) -> None:
    """One harness grid per method (its petkit arm and its PEFT twin), in the grid file's order."""
    import petkit.benchmark as bench

    grid = _grid()
    methods = list(dict.fromkeys(_method(e) for e in grid["methods"]))
    for method in [m for m in methods if not only or m in only]:
        spec = {**grid, "methods": [e for e in grid["methods"] if _method(e) == method]}
        report = bench.run(spec, OUT / method, progress=False)
        print(method, "failed:", [r["error"] for r in report.failed], flush=True)


KEEP = ("arm", "seed", "test_metric", "s_per_step", "peak_mem_mb", "trainable_params", "finished")
SAVED = ROOT / "docs" / "peft_twins.json"


def collect(runs: Path = OUT, saved: Path = SAVED) -> dict[str, list[dict]]:
    """{method: its cells} from `saved`, with every method that has cells under `runs` replacing
    its saved ones (so a later run of a method supersedes the earlier one); written back."""
    cells = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    for folder in sorted(p for p in runs.glob("*") if (p / "cells.jsonl").exists()):
        records = [json.loads(x) for x in (folder / "cells.jsonl").read_text().splitlines()]
        ok = [{k: r[k] for k in KEEP} for r in records if r.get("status") == "ok"]
        if ok:
            cells[folder.name] = ok
    cells = dict(sorted(cells.items()))
    saved.write_text(json.dumps(cells, indent=1) + "\n", encoding="utf-8")
    return cells


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(float(r[key]) for r in rows)


def table(cells: dict[str, list[dict]]) -> str:
    """Markdown: per method, both arms' test accuracy (mean of seeds; "seeds alike": seeds where
    both arms scored the same), trainable parameters, wall s/step and their ratio, peak memory."""
    lines = ["| method | trainable petkit | trainable PEFT | test acc petkit (%) | test acc PEFT (%) | "
             "petkit - PEFT (points) | seeds | seeds alike | s/step petkit | s/step PEFT | petkit / PEFT | "
             "peak MiB petkit | peak MiB PEFT |", "| --- |" + " ---: |" * 12]
    for method, rows in cells.items():
        ours = [r for r in rows if not r["arm"].startswith("peft:")]
        theirs = [r for r in rows if r["arm"].startswith("peft:")]
        if not ours or not theirs:
            continue
        acc, acc_p = _mean(ours, "test_metric"), _mean(theirs, "test_metric")
        step, step_p = _mean(ours, "s_per_step"), _mean(theirs, "s_per_step")
        alike = len({(r["seed"], r["test_metric"]) for r in ours} & {(r["seed"], r["test_metric"]) for r in theirs})
        lines.append(f"| {method} | {ours[0]['trainable_params']:,} | {theirs[0]['trainable_params']:,} | "
                     f"{100 * acc:.1f} | {100 * acc_p:.1f} | {100 * (acc - acc_p):+.1f} | "
                     f"{min(len(ours), len(theirs))} | {alike} | {step:.3f} | {step_p:.3f} | {step / step_p:.2f} | "
                     f"{_mean(ours, 'peak_mem_mb'):.0f} | {_mean(theirs, 'peak_mem_mb'):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2].split(",") if len(sys.argv) > 2 else None)
    else:
        print(table(collect()))
