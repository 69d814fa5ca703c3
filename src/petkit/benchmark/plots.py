"""PNG plots of a grid (matplotlib, Agg), one set per task:

- `<task>-metric-vs-params.png`: test metric against trainable parameters (log x), one point per
  arm with a ±std error bar, one panel per training size;
- `<task>-metric-vs-size.png`: test metric against training-set size, one line per arm;
- `<task>-stability.png`: std of the test metric over seeds against trainable parameters;
- `<task>-cost.png`: peak memory and time per step, one bar per arm.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from petkit.benchmark.report import Summary, sizes_of, summarise

MARKERS = {"petkit": "o", "peft": "s", "full": "*"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(summaries: list[Summary]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab20")
    return {s.arm: cmap(i % 20) for i, s in enumerate(summaries)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _metric_vs_params(rows: list[Summary], path: Path) -> None:
    plt, sizes, colors = _plt(), sizes_of(rows), _colors(rows)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.5), squeeze=False,
                             sharey=True)
    for ax, size in zip(axes[0], sizes):
        for s in rows:
            stats, params = s.mean_std(size), s.cost("trainable_params")
            if stats is None or not params:
                continue
            ax.errorbar(params, stats[0], yerr=stats[1], fmt=MARKERS.get(s.impl, "o"),
                        color=colors[s.arm], capsize=3, label=s.arm)
            ax.annotate(s.arm, (params, stats[0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(f"n={size}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test {rows[0].metric}")
    _save(fig, path)


def _metric_vs_size(rows: list[Summary], path: Path) -> None:
    plt, colors = _plt(), _colors(rows)
    fig, ax = plt.subplots(figsize=(9, 5))
    for s in rows:
        sizes = sizes_of([s])
        stats = [s.mean_std(k) or (0.0, 0.0, 0) for k in sizes]
        xs = [int(k) if s.unit == "k" else sum(s.n_train[k]) / len(s.n_train[k])
              for k in sizes]  # "full" at its real size
        ys, es = [st[0] for st in stats], [st[1] for st in stats]
        ax.errorbar(xs, ys, yerr=es, marker=MARKERS.get(s.impl, "o"), color=colors[s.arm],
                    capsize=3, label=s.arm, linestyle="--" if s.impl == "peft" else "-")
    ax.set_xscale("log", base=2)
    if rows[0].unit == "k":  # shots: plain numbers on the axis
        shots = sorted({int(k) for s in rows for k in sizes_of([s])})
        ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class" if rows[0].unit == "k"
                  else "training examples (validation carved from them)")
    ax.set_ylabel(f"test {rows[0].metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def _stability(rows: list[Summary], path: Path) -> None:
    plt, sizes = _plt(), sizes_of(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, size in enumerate(sizes):
        pts = [(s.cost("trainable_params"), s.mean_std(size)) for s in rows]
        pts = [(p, st[1]) for p, st in pts if p and st and st[2] > 1]
        if pts:
            ax.scatter(*zip(*pts), label=f"n={size}", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"std of test {rows[0].metric} over seeds")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=8)
    _save(fig, path)


def _cost(rows: list[Summary], path: Path) -> None:
    plt, colors = _plt(), _colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.5), sharey=True)
    names = [s.arm for s in rows]
    for ax, col, label in ((axes[0], "peak_mem_mb", "peak memory above baseline (MiB)"),
                           (axes[1], "s_per_step", "seconds per optimiser step")):
        ax.barh(names, [s.cost(col) or 0.0 for s in rows], color=[colors[n] for n in names])
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)


def plot_all(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write the four PNGs of every task with finished cells into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summaries = [s for s in summarise(records) if s.quality]
    for task in dict.fromkeys(s.task for s in summaries):
        rows = [s for s in summaries if s.task == task]
        for suffix, draw in (("metric-vs-params", _metric_vs_params),
                             ("metric-vs-size", _metric_vs_size), ("stability", _stability),
                             ("cost", _cost)):
            path = folder / f"{_slug(task)}-{suffix}.png"
            draw(rows, path)
            written.append(path)
    return written
