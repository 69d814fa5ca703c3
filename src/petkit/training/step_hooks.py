"""Per-step hooks that methods declare on their wrappers, run by the training loop.

A wrapper (found by its declared capability, never by method name) may be

    StepHooked:     on_train_step(step, total_steps)  # after each optimiser step, and once
                                                      # before the first (step = start step)
    ReportsMetrics: train_metrics() -> dict[str, float]  # extra numbers for each train log row

(Protocols in `petkit.core.capabilities`.)
Chain of LoRA uses the first to freeze a link and start the next on its schedule; mixtures of
LoRA experts use the second to report expert load. A custom training loop gets the same
behaviour by calling `StepHooks(model).on_step(step, total)` after each step.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from petkit.core.capabilities import ReportsMetrics, StepHooked
from petkit.core.delta import iter_deltas


class StepHooks:
    """The step hooks and metric sources of a model's active wrappers."""

    def __init__(self, model: nn.Module) -> None:
        wrappers = [w for _, w in iter_deltas(model) if w.active]
        self.steps: list[Callable[[int, int], None]] = [
            w.on_train_step for w in wrappers if isinstance(w, StepHooked)]
        self.sources: list[Callable[[], dict[str, float]]] = [
            w.train_metrics for w in wrappers if isinstance(w, ReportsMetrics)]

    def on_step(self, step: int, total_steps: int) -> None:
        """Tell every wrapper that `step` optimiser steps of `total_steps` are done."""
        for hook in self.steps:
            hook(step, total_steps)

    def metrics(self) -> dict[str, float]:
        """Each metric averaged over the wrappers that report it."""
        sums: dict[str, list[float]] = {}
        for source in self.sources:
            for key, value in source().items():
                sums.setdefault(key, []).append(value)
        return {k: sum(v) / len(v) for k, v in sums.items()}
