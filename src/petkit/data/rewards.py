"""Embedded reward and metric functions for generation tasks (`--reward`, `--metric`).

Every function has the signature petkit calls user functions with:

    fn(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]

one value per completion; `rows[i]` is the data row completion i answers (its "reference", ...).

    petkit.data.rewards:exact_number   1.0 when the completion's final number equals the row's
                                       reference number (arithmetic: "42", "17 + 25 = 42.")
    petkit.data.rewards:exact_match    1.0 when the completion's first line, stripped, equals
                                       the reference, stripped (`--metric exact`)
    petkit.data.rewards:contains       1.0 when the reference occurs in the completion
                                       (`--metric contains`)
"""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in `text` (an integer or a decimal), or None."""
    found = NUMBER.findall(text)
    return float(found[-1]) if found else None


def _reference(row: dict[str, Any]) -> str:
    return str(row.get("reference", row.get("completion", "")))


def exact_number(prompts: list[str], completions: list[str],
                 rows: list[dict[str, Any]]) -> list[float]:
    """1.0 where the completion's final number equals the reference's number, else 0.0."""
    out = []
    for completion, row in zip(completions, rows):
        got, want = final_number(completion), final_number(_reference(row))
        out.append(float(got is not None and want is not None and got == want))
    return out


def exact_match(prompts: list[str], completions: list[str],
                rows: list[dict[str, Any]]) -> list[float]:
    """1.0 where the completion's first line (stripped) equals the stripped reference."""
    return [float(c.strip().split("\n", 1)[0].strip() == _reference(r).strip())
            for c, r in zip(completions, rows)]


def contains(prompts: list[str], completions: list[str],
             rows: list[dict[str, Any]]) -> list[float]:
    """1.0 where the stripped reference occurs in the completion."""
    return [float(_reference(r).strip() in c) for c, r in zip(completions, rows)]


METRICS = {"exact": "petkit.data.rewards:exact_match", "contains": "petkit.data.rewards:contains",
           "exact-number": "petkit.data.rewards:exact_number"}
