"""PNG of each task's accuracy over the sequence (one line per task, from when it is learned)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_matrix(matrix: Sequence[Sequence[float | None]], names: Sequence[str], path: Path,
                title: str) -> Path:
    """Line i: accuracy on task i after each task t >= i (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = list(range(1, len(matrix) + 1))
    for i, name in enumerate(names):
        points = [(s, row[i]) for s, row in zip(steps, matrix) if row[i] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], marker="o", label=f"{i + 1}: {name}")
    ax.set_xticks(steps)
    ax.set_xlabel("after learning task")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_panels(matrices: dict[str, Sequence[Sequence[float | None]]], names: Sequence[str],
                path: Path, title: str) -> Path:
    """One panel per strategy, each drawn like `plot_matrix` (a line per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(matrices)
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.2), sharey=True, squeeze=False)
    for ax, (strategy, matrix) in zip(axes[0], matrices.items()):
        steps = list(range(1, len(matrix) + 1))
        for i, name in enumerate(names):
            points = [(s, row[i]) for s, row in zip(steps, matrix) if row[i] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [100 * y for y in ys], marker="o", label=name)
        ax.set_title(strategy, fontsize=9)
        ax.set_xticks(steps)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_xlabel("after task")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
