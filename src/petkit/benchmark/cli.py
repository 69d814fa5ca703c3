"""`petkit bench GRID.yaml --output DIR`: the subcommand's flags and what it does.

    petkit bench docs/bench/results.yaml --output runs/bench-results   # run or resume
    petkit bench docs/bench/results.yaml --output runs/bench-results --report-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from petkit.benchmark.harness import run, write_report
from petkit.core.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `petkit bench`."""
    parser.add_argument("spec", help="grid YAML file (tasks, methods, seeds, sizes, train)")
    parser.add_argument("--output", dest="bench_output", default=None,
                        help="run folder (default: runs/bench-<spec name>); re-running resumes")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run cells recorded as failed again")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the CSV, tables and plots from finished cells")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--shard", default="1/1", help="I/N: run the I-th of N interleaved parts "
                        "(start N processes on one --output to use N cores)")


def parse_shard(text: str) -> tuple[int, int]:
    """"2/3" -> (2, 3); ConfigError unless 1 <= I <= N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise ConfigError(f"--shard must look like I/N with 1 <= I <= N, got {text!r}")
    return int(index), int(count)


def command(args: argparse.Namespace, dotted: dict[str, str]) -> str:
    """Run the grid (or only the report); return a short summary for the console."""
    if dotted:
        raise ConfigError(f"petkit bench takes no --section.field overrides ({sorted(dotted)}); "
                          "put them in the grid file")
    out = Path(args.bench_output or f"runs/bench-{Path(args.spec).stem}")
    if args.report_only:
        report = write_report(out, title=f"Benchmark: {out.name}")
    else:
        report = run(args.spec, out, retry_failed=args.retry_failed,
                           progress=not args.no_progress, shard=parse_shard(args.shard))
    ok = len(report.records) - len(report.failed)
    return (f"{ok} cells finished, {len(report.failed)} failed -> {report.csv}, "
            f"{report.markdown}, {len(report.plots)} plots in {out / 'plots'}")
