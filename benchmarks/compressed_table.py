"""The tables `benchmarks/compressed.py` prints from its cell caches: the compressed-bases table
of docs/compressed.md and the learning-rate selection table (validation accuracy per candidate)."""
from __future__ import annotations

from typing import Any


def render(cache: dict[str, Any], arms: list[str], suffix: str = "") -> str:
    """The markdown table: one row per (setting, arm of `arms`), mean over the seeds run (keys
    ending in `suffix`: one protocol of the long cache)."""
    rows = ["| setting | arm | seeds | accuracy | trainable | peak train MB | s/step | stored MB | forward speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    for setting in ("decoder", "encoder"):
        for arm in arms:
            cells = [c for k, c in cache.items()
                     if k.startswith(f"{setting}/{arm}/") and k.endswith(suffix) and "accuracy" in c]
            if not cells:
                continue
            mean = lambda key: sum(c[key] for c in cells) / len(cells)  # noqa: E731
            accs = ", ".join(f"{c['accuracy']:.3f}" for c in cells)
            trainable = round(mean_of(cells, "trainable_live") or cells[0]["trainable"])  # APT: live ranks
            speed = _speed_up(cells)
            rows.append(f"| {setting} | {arm} | {len(cells)} | {mean('accuracy'):.3f} ({accs}) | {trainable:,} | "
                        f"{mean('peak_train_mb'):,.0f} | {mean('wall_s_per_step'):.2f} | {mean('stored_mb'):,.1f} | {speed} |")
    return "\n".join(rows)


def mean_of(cells: list[dict[str, Any]], key: str) -> float | None:
    """Mean of `key` over the cells that have it (None if none does)."""
    values = [c[key] for c in cells if key in c]
    return sum(values) / len(values) if values else None


def _speed_up(cells: list[dict[str, Any]]) -> str:
    """Mean forward speed-up of the pruned model over the seeds, in wall and in CPU time."""
    out = []
    for kind in ("", "_cpu"):
        ratios = [c[f"forward{kind}_s_unpruned"] / c[f"forward{kind}_s_pruned"] for c in cells
                  if c.get(f"forward{kind}_s_pruned")]
        if ratios:
            out.append(f"{sum(ratios) / len(ratios):.2f}x {'CPU' if kind else 'wall'}")
    return ", ".join(out)


def render_selection(cache: dict[str, Any], suffix: str, candidates: list[float | None]) -> str:
    """Validation accuracy per candidate lr: one row per (setting, arm, seed) of this protocol."""
    rows = ["| setting | arm | seed | head_lr | " + " | ".join(f"lr {lr:g}" for lr in candidates if lr)
            + " | chosen |", "|---" * (5 + len(candidates)) + "|"]
    seen = sorted({k.split("/lr")[0] for k in cache if k.split("/lr")[0].endswith(suffix) and "/lr" in k})
    for prefix in seen:
        cells = [cache.get(f"{prefix}/lr{lr:g}", {}) for lr in candidates if lr]
        scores = [c.get("val_accuracy") for c in cells]
        if not any(s is not None for s in scores):
            continue
        best = max((s, -i) for i, s in enumerate(scores) if s is not None)  # ties: the smaller lr
        setting, arm, seed = prefix.split("/")[:3]
        head = next((c.get("head_lr") for c in cells if c), None)
        shown = [("n/a" if s is None else f"{s:.3f}") for s in scores]
        rows.append(f"| {setting} | {arm} | {seed} | {head if head is not None else '-'} | "
                    + " | ".join(shown) + f" | {candidates[-best[1]]:g} |")
    return "\n".join(rows)
