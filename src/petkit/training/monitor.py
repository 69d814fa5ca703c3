"""What a run reports: a progress bar, `metrics.jsonl`, `train.log`, a PNG of the curves, and
the experiment trackers `TrainConfig.report_to` names (`training/tracking.py`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from petkit.training.tracking import Tracker

LOG = logging.getLogger("petkit.training")


class Monitor:
    """Progress bar plus, when `output_dir` is set, a JSONL metrics log and a text log; every
    metrics row also goes to `trackers` (TensorBoard, MLflow)."""

    def __init__(self, output_dir: Path | None, total: int, initial: int,
                 history: list[dict[str, Any]], progress: bool,
                 trackers: Sequence[Tracker] = ()) -> None:
        """Open the bar at step `initial` of `total` and restart metrics.jsonl from `history` (a
        resumed run's rows, or []): rows an interrupted run wrote after its checkpoint go away."""
        self.output_dir = output_dir
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                        disable=not progress, dynamic_ncols=True, leave=True)
        self.handler: logging.Handler | None = None
        self.postfix: dict[str, str] = {}
        self.trackers = list(trackers)
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(output_dir / "train.log")
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            LOG.addHandler(self.handler)
            LOG.setLevel(logging.INFO)
            lines = "".join(json.dumps(r) + "\n" for r in history)
            (output_dir / "metrics.jsonl").write_text(lines, encoding="utf-8")

    def info(self, message: str) -> None:
        """One line to train.log."""
        LOG.info(message)

    def record(self, row: dict[str, Any]) -> None:
        """Append a metrics row to metrics.jsonl and train.log; show it on the bar."""
        shown = {k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float)}
        self.postfix.update(shown)
        self.bar.set_postfix(self.postfix, refresh=False)
        self.info(" ".join(f"{k}={v}" for k, v in row.items()))
        if self.output_dir is not None:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(row)

    def advance(self) -> None:
        """One optimiser step done."""
        self.bar.update(1)

    def close(self) -> None:
        """Close the bar, finish the trackers and detach the log file."""
        self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.handler is not None:
            LOG.removeHandler(self.handler)
            self.handler.close()


def plot_history(history: list[dict[str, Any]], path: Path, metric: str) -> Path:
    """PNG of train loss and the eval `metric` against the step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    evals = [(r["step"], r[f"eval_{metric}"]) for r in history if f"eval_{metric}" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if evals:
        twin = ax.twinx()
        twin.plot(*zip(*evals), "o-", label=f"eval {metric}", color="tab:orange")
        twin.set_ylabel(f"eval {metric}")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
