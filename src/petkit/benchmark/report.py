"""Cell records -> per (task, arm, size) mean +- std over seeds -> Markdown tables.

Quality is the test metric of each cell (accuracy, or loss for instruction tasks); spread is the
sample standard deviation over seeds. Costs (trainable parameters, peak memory, time per step,
bytes on disk) are means over all of an arm's finished cells on the task.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from petkit.core.disk import format_bytes

Record = dict[str, Any]
IMPL_ORDER = {"full": 0, "linear-probe": 0, "petkit": 1, "peft": 2}


@dataclass
class Summary:
    """One arm on one task: quality per size and mean costs."""

    task: str
    arm: str
    impl: str
    family: str
    metric: str
    unit: str = "n"  # sizes count training examples (n) or shots per class (k)
    quality: dict[str, list[float]] = field(default_factory=dict)  # size -> per-seed metrics
    n_train: dict[str, list[int]] = field(default_factory=dict)  # size -> examples used
    costs: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def mean_std(self, size: str) -> tuple[float, float, int] | None:
        """(mean, std, seeds) of the test metric at `size`; std is 0 for one seed."""
        values = self.quality.get(size)
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), std, len(values)

    def cost(self, name: str) -> float | None:
        """Mean of a cost column over the arm's finished cells."""
        values = self.costs.get(name)
        return statistics.fmean(values) if values else None


COST_COLUMNS = ("trainable_params", "trainable_pct", "peak_mem_mb", "s_per_step",
                "adapter_bytes")


def summarise(records: list[Record]) -> list[Summary]:
    """Group records by (task, arm); sorted full first, then by method, petkit before peft."""
    groups: dict[tuple[str, str], Summary] = {}
    for r in records:
        key = (r["task"], r["arm"])
        if key not in groups:
            groups[key] = Summary(r["task"], r["arm"], r["impl"], r["family"],
                                  r.get("metric") or "accuracy", r.get("unit") or "n")
        s = groups[key]
        if r.get("status") != "ok":
            s.failed.append(f"n={r['size']} seed={r['seed']}: {r.get('error')}")
            continue
        s.metric = r["metric"]
        s.quality.setdefault(str(r["size"]), []).append(float(r["test_metric"]))
        s.n_train.setdefault(str(r["size"]), []).append(int(r["n_train"]) + int(r["n_val"]))
        for col in COST_COLUMNS:
            s.costs.setdefault(col, []).append(float(r[col]))
    method = {s.arm: s.arm.split(":", 1)[-1] for s in groups.values()}
    return sorted(groups.values(), key=lambda s: (s.task, IMPL_ORDER.get(s.impl, 3) > 0,
                                                  method[s.arm], IMPL_ORDER.get(s.impl, 3)))


def sizes_of(summaries: list[Summary]) -> list[str]:
    """Sizes present, numeric ones ascending, "full" last."""
    found = {size for s in summaries for size in s.quality}
    return sorted(found, key=lambda x: (x == "full", int(x) if x.isdigit() else 0))


def _fmt_count(n: float | None) -> str:
    return "–" if n is None else f"{n:,.0f}"


def _fmt_quality(value: tuple[float, float, int] | None) -> str:
    if value is None:
        return "–"
    mean, std, n = value
    return f"{mean:.3f} ± {std:.3f} ({n})"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def task_table(summaries: list[Summary]) -> str:
    """Markdown table of one task's arms."""
    sizes = sizes_of(summaries)
    metric = summaries[0].metric if summaries else "metric"
    unit = summaries[0].unit if summaries else "n"
    head = ["arm", "family", "trainable", "% of base", *[f"{metric} {unit}={s}" for s in sizes],
            "peak MiB", "s/step", "on disk"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [s.arm, s.family, _fmt_count(s.cost("trainable_params")),
               _fmt(s.cost("trainable_pct"), ".3f") + ("%" if s.cost("trainable_pct") else ""),
               *[_fmt_quality(s.mean_std(size)) for size in sizes],
               _fmt(s.cost("peak_mem_mb"), ".0f"), _fmt(s.cost("s_per_step"), ".2f"),
               format_bytes(s.cost("adapter_bytes"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def failures(summaries: list[Summary]) -> str:
    """Bullet list of failed cells, one line per arm and error."""
    lines = []
    for s in summaries:
        by_error: dict[str, int] = defaultdict(int)
        for entry in s.failed:
            by_error[entry.split(": ", 1)[-1]] += 1
        lines += [f"- {s.task} / {s.arm}: {n} cell(s) failed: `{err}`"
                  for err, n in by_error.items()]
    return "\n".join(lines)


def markdown(records: list[Record], title: str = "Benchmark") -> str:
    """The whole report: one table per task (mean ± std over seeds (seeds)), then failures."""
    summaries = summarise(records)
    selection = ("Validation carved from each training subset selects the best step"
                 if any(r.get("n_val") for r in records) else
                 "No validation split: the last step is kept")
    out = [f"# {title}", "",
           "Test metric: mean ± sample std over seeds (number of seeds). Costs: mean over the "
           f"arm's finished cells. {selection}; the test split is read once, after training.",
           ""]
    for task in dict.fromkeys(s.task for s in summaries):
        rows = [s for s in summaries if s.task == task]
        first = next(r for r in records if r["task"] == task)
        out += [f"## {task}: {first['model']} on {first['data']}", "", task_table(rows), ""]
    failed = failures(summaries)
    if failed:
        out += ["## Failed cells", "", failed, ""]
    return "\n".join(out)
