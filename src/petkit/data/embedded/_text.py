"""Text helpers shared by several embedded tasks (not a task: the leading "_" keeps it out of
discovery)."""

from __future__ import annotations

from pathlib import Path


def dedupe_texts(rows: list[tuple[str, int]]) -> list[dict]:
    """One example per text; texts seen with two different labels are dropped."""
    labels: dict[str, set[int]] = {}
    for text, label in rows:
        labels.setdefault(text, set()).add(label)
    return [{"text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]


def read_text(path: Path) -> str:
    """UTF-8, or latin-1 for the odd file that is not (one BBC article)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
