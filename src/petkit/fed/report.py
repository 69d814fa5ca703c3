"""What a federated run reports: one JSON row per round, a final report, a plot, console lines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from petkit.core.disk import format_bytes
from petkit.core.disk_full import append_text, write_file

Row = dict[str, Any]


def round_line(row: Row) -> str:
    """One console line for a finished round."""
    parts = [f"round {row['round']:>3}"]
    for key, label in (("test_accuracy", "test acc"), ("test_loss", "test loss"),
                       ("client_accuracy", "client acc"), ("client_personal-accuracy", "personal acc"),
                       ("train_loss", "train loss")):
        if key in row and row[key] is not None and math.isfinite(row[key]):
            parts.append(f"{label} {row[key]:.4f}")
    if row["round"] > 0:
        moved = row["bytes_down"] + row["bytes_up"] + row["bytes_down_eval"]
        parts.append(f"sent {format_bytes(moved, 2)} (full-model FedAvg {format_bytes(row['full_model_bytes'], 2)})")
        parts.append(f"clients {len(row['accepted'])}/{row['sampled']}")
        if row["rejected"]:
            parts.append(f"rejected {len(row['rejected'])}")
    if "epsilon" in row:
        parts.append(f"epsilon {row['epsilon']:.3g}")
    return " | ".join(parts)


def totals(rows: list[Row]) -> dict[str, float]:
    """Bytes over all rounds and the saving vs full-model FedAvg."""
    keys = ("bytes_down", "bytes_up", "bytes_down_eval", "full_model_bytes")
    out: dict[str, float] = {k: sum(r.get(k, 0) for r in rows) for k in keys}
    out["bytes"] = out["bytes_down"] + out["bytes_up"] + out["bytes_down_eval"]
    out["saving_factor"] = out["full_model_bytes"] / out["bytes"] if out["bytes"] else math.inf
    return out


def append_row(out: Path, row: Row) -> None:
    """Append one round's row to metrics.jsonl."""
    append_text(out / "metrics.jsonl", json.dumps(row, default=_jsonable) + "\n")


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """report.json (atomic rename; a full disk keeps the previous one)."""
    return write_file(out / "report.json",
                      json.dumps(report, indent=1, default=_jsonable).encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def plot_rounds(report: dict[str, Any], path: Path, references: dict[str, float] | None = None) -> Path:
    """Test accuracy (server) and mean client accuracy per round; dashed reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("test_accuracy", "global adapter, server test split"),
                       ("client_accuracy", "global adapter, clients' own splits"),
                       ("client_personal-accuracy", "shared + local adapter, clients' own splits")):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=label, markersize=3)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{i + 4}", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(report.get("title", "federated tuning"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
