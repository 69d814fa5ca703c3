"""`petkit bench GRID.yaml --output DIR`: the subcommand's flags and what it does.

    petkit bench docs/bench/results.yaml --output runs/bench-results   # run or resume
    petkit bench docs/bench/results.yaml --output runs/bench-results --report-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from petkit.core.errors import ConfigError, did_you_mean
from petkit.recipes import shipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `petkit bench`."""
    parser.add_argument("spec", nargs="?", default=None,
                        help="grid YAML file (tasks, methods, seeds, sizes, train) or a shipped "
                             "grid's name")
    parser.add_argument("--recipe", dest="bench_recipe", default=None, metavar="NAME|FILE",
                        help=f"a shipped grid ({', '.join(sorted(shipped_grids()))}: quick runs in "
                             "about a CPU minute) or a grid YAML file")
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


def shipped_grids() -> dict[str, Path]:
    """Grids shipped with petkit (`petkit/recipes/bench/*.yaml`), by name."""
    return shipped("bench")


def grid_path(args: argparse.Namespace) -> Path:
    """The grid file named by the positional spec or --recipe: a file, or a shipped grid's name."""
    if args.spec and args.bench_recipe:
        raise ConfigError("petkit bench takes a grid file or --recipe, not both")
    given = args.spec or args.bench_recipe
    if given is None:
        raise ConfigError(f"petkit bench needs a grid: a YAML file or --recipe NAME "
                          f"({', '.join(sorted(shipped_grids()))})")
    if Path(given).is_file():
        return Path(given)
    if given in shipped_grids():
        return shipped_grids()[given]
    raise ConfigError(f"bench grid {given!r}{did_you_mean(given, shipped_grids())} is not a file "
                      f"nor a shipped grid ({', '.join(sorted(shipped_grids()))})")


def command(args: argparse.Namespace, dotted: dict[str, str]) -> str:
    """Run the grid (or only the report); return a short summary for the console. `dotted`:
    the --train.F / --runtime.F options, applied to every cell's run."""
    from petkit.benchmark.harness import run, write_report  # torch and the models: only to run

    spec = grid_path(args)
    out = Path(args.bench_output or f"runs/bench-{spec.stem}")
    if args.report_only and dotted:
        raise ConfigError(f"--report-only runs no cell; --{next(iter(dotted))} has nothing to change")
    if args.report_only:
        report = write_report(out, title=f"Benchmark: {out.name}")
    else:
        report = run(spec, out, retry_failed=args.retry_failed, progress=not args.no_progress,
                     shard=parse_shard(args.shard), overrides=dotted)
    ok = len(report.records) - len(report.failed)
    return (f"{ok} cells finished, {len(report.failed)} failed -> {report.csv}, "
            f"{report.markdown}, {len(report.plots)} plots in {out / 'plots'}")
