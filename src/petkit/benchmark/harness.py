"""Run a grid into a folder and write its CSV, Markdown tables and plots."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from petkit.benchmark.plots import plot_all
from petkit.benchmark.report import markdown
from petkit.benchmark.runner import run_grid
from petkit.benchmark.spec import BenchSpec, load_spec, spec_from_dict, with_overrides
from petkit.benchmark.store import ResultStore


@dataclass
class BenchReport:
    """Where a grid's outputs are, and its cell records."""

    folder: Path
    records: list[dict[str, Any]]
    csv: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Records of failed cells."""
        return [r for r in self.records if r.get("status") != "ok"]


def _as_spec(spec: str | Path | BenchSpec | dict[str, Any]) -> BenchSpec:
    if isinstance(spec, BenchSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec)
    return load_spec(spec)


def write_report(folder: str | Path, records: list[dict[str, Any]] | None = None,
                 title: str = "Benchmark") -> BenchReport:
    """Write cells.csv, results.md and the PNGs of a run folder (from cells.jsonl by default)."""
    out = Path(folder)
    store = ResultStore(out)
    if records is None:
        records = list(store.load().values())
    csv = store.write_csv(records)
    md = out / "results.md"
    md.write_text(markdown(records, title), encoding="utf-8")
    return BenchReport(out, records, csv, md, plot_all(records, out / "plots"))


def run(spec: str | Path | BenchSpec | dict[str, Any], output_dir: str | Path, *,
        retry_failed: bool = False, progress: bool = True, shard: tuple[int, int] = (1, 1),
        echo: Callable[[str], None] = print,
        overrides: dict[str, str] | None = None) -> BenchReport:
    """Run (or resume) the grid `spec` into `output_dir`; write the CSV, tables and plots.

    `shard=(i, n)`: this process runs the i-th of n interleaved parts of the grid (1-based);
    start n processes on the same folder to use n cores. `overrides`: {"train.lr": "1e-3",
    "runtime.device": "cpu", ...} applied to every run's TrainConfig (`petkit bench --train.lr`).
    """
    grid = _as_spec(spec)
    grid = with_overrides(grid, overrides) if overrides else grid
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, (str, Path)):
        (out / "spec.yaml").write_text(Path(spec).read_text(encoding="utf-8"), encoding="utf-8")
    elif isinstance(spec, dict):
        (out / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    records = run_grid(grid, out, retry_failed=retry_failed, progress=progress, shard=shard,
                       echo=echo)
    return write_report(out, records, title=f"Benchmark: {out.name}")
