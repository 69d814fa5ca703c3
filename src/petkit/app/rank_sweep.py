"""Accuracy against rank from one training run, for adapters that train a range of ranks (DyLoRA).

    petkit train --method dylora --dylora-eval-ranks 1,2,4,8     # train once, test at each rank
    petkit eval --adapter runs/dylora/adapter --rank 2             # test a saved adapter at rank 2
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petkit.core.errors import ConfigError
from petkit.app.pipeline import load_with_adapter, test_metrics
from petkit.core.capabilities import RankRange, capable_text, set_rank
from petkit.core.state import active_adapters


def parse_ranks(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8] (each an int >= 1)."""
    try:
        ranks = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"ranks must be comma-separated integers like 1,2,4,8, got {text!r}") from None
    if not ranks or any(r < 1 for r in ranks):
        raise ConfigError(f"ranks must be comma-separated integers >= 1, got {text!r}")
    return ranks


def check_ranks(method_config: Any, ranks: Sequence[int]) -> None:
    """Fail before training if the method has no rank range or a rank is outside it."""
    if not isinstance(method_config, RankRange):
        raise ConfigError(f"evaluating at several ranks needs a method trained over a range of ranks "
                          f"({capable_text(RankRange)}); this run's method is {method_config.method!r}")
    for rank in ranks:
        method_config.at_rank(rank)


def evaluate_at_ranks(recipe: Any, adapter: str | Path, ranks: Sequence[int]) -> dict[int, dict[str, float]]:
    """Test metrics of the saved adapter at each rank (one model load; no retraining)."""
    prep = load_with_adapter(recipe, adapter)
    name = active_adapters(prep.model)[0]
    out = {}
    for rank in ranks:
        set_rank(prep.model, rank, name)
        out[rank] = test_metrics(prep, recipe)
    return out


def write_sweep(results: dict[int, dict[str, float]], path: Path) -> Path:
    """rank -> metrics as JSON next to the run's other outputs."""
    path.write_text(json.dumps({str(r): m for r, m in results.items()}, indent=2), encoding="utf-8")
    return path
