"""Continual tuning benchmark: strategies x sequences x seeds on minilm-l6 (CPU-sized).

    python benchmarks/continual.py --shard 1/2 &  python benchmarks/continual.py --shard 2/2
    python benchmarks/continual.py --report       # table + plots into docs/

Each (sequence, strategy, seed) run writes runs/continual-bench/<seq>/<strategy>-s<seed>/
(results.json, accuracy.png, adapters/); finished runs are skipped, so re-running resumes.
`--report` averages the seeds into docs/continual_results.json, prints the markdown table and
draws docs/continual-<seq>.png (each task's accuracy over time, one panel per strategy).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from petkit.continual import run_continual
from petkit.continual.plots import plot_panels
from petkit.continual.strategy import DEFAULT_TRAIN

SEQUENCES = ("bbc-classes", "domains")
STRATEGIES = ("sequential", "multitask", "per-task", "o-lora", "inflora", "hide", "conpet")
RUNS = Path("runs/continual-bench")
DOCS = Path("docs")


def cells(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(sequence, strategy, seed), seeds outermost so that seed 0 finishes first."""
    return [(seq, strat, seed) for seed in args.seeds for seq in args.sequences
            for strat in args.strategies]


def run_cell(seq: str, strategy: str, seed: int, args: argparse.Namespace) -> None:
    out = RUNS / seq / f"{strategy}-s{seed}"
    if (out / "results.json").exists():
        return
    train = DEFAULT_TRAIN.replace(seed=seed, max_steps=args.steps, lr=args.lr,
                                  batch_size=args.batch_size)
    result = run_continual(seq, strategy, train=train, max_train=args.max_train,
                           max_test=args.max_test, max_length=args.max_length, output_dir=out)
    print(f"{seq} {strategy} s{seed}: {result.metrics} ({result.seconds:.0f}s)", flush=True)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def _sd(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 else None


def _cell(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def report() -> None:
    """Average seeds; write docs/continual_results.json, print the table, draw the plots."""
    summary: dict[str, dict] = {}
    lines = ["| sequence | strategy | task id at test | seeds | avg acc | forgetting | BWT | "
             "avg acc (task id given) | forgetting (task id given) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seq in SEQUENCES:
        panels = {}
        for strategy in STRATEGIES:
            found = sorted((RUNS / seq).glob(f"{strategy}-s*/results.json"))
            if not found:
                continue
            runs = [json.loads(p.read_text()) for p in found]
            keys = ("average_accuracy", "forgetting", "backward_transfer")
            row = {k: _mean([r["metrics"][k] for r in runs]) for k in keys}
            row |= {f"{k}_sd": _sd([r["metrics"][k] for r in runs]) for k in keys}
            row |= {f"{k}_task_aware": _mean([r["metrics_task_aware"][k] for r in runs])
                    for k in keys}
            row["seeds"], row["uses_task_id"] = len(runs), runs[0]["uses_task_id"]
            size = len(runs[0]["matrix"])
            row["matrix"] = [[_mean([r["matrix"][t][i] for r in runs]) for i in range(size)]
                             for t in range(size)]
            row["tasks"] = runs[0]["tasks"]
            summary.setdefault(seq, {})[strategy] = row
            panels[strategy + (" (task id)" if row["uses_task_id"] else "")] = row["matrix"]
            lines.append(
                f"| {seq} | {strategy} | {'yes' if row['uses_task_id'] else 'no'} | {len(runs)} | "
                f"{_cell(row['average_accuracy'], row['average_accuracy_sd'])} | "
                f"{_cell(row['forgetting'], row['forgetting_sd'])} | "
                f"{_cell(row['backward_transfer'], row['backward_transfer_sd'])} | "
                f"{_cell(row['average_accuracy_task_aware'], None)} | "
                f"{_cell(row['forgetting_task_aware'], None)} |")
        if panels:
            tasks = next(iter(summary[seq].values()))["tasks"]
            plot_panels(panels, tasks, DOCS / f"continual-{seq}.png",
                        f"{seq}: accuracy on each task after each task (no task id; "
                        f"mean of seeds)")
    (DOCS / "continual_results.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", nargs="+", default=list(SEQUENCES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train", type=int, default=400)
    parser.add_argument("--max-test", type=int, default=150)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--shard", default="1/1", help="I/N: run every N-th cell from the I-th")
    parser.add_argument("--report", action="store_true", help="only aggregate into docs/")
    args = parser.parse_args()
    if args.report:
        report()
        return
    index, count = (int(x) for x in args.shard.split("/"))
    for k, (seq, strategy, seed) in enumerate(cells(args)):
        if k % count == index - 1:
            run_cell(seq, strategy, seed, args)


if __name__ == "__main__":
    main()
