"""Learning-rate schedules as a pure function of the step (so resuming needs only the step)."""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based).

    Linear warm-up from ~0 to 1 over `warmup_steps`, then "constant", "linear" decay to 0 at
    `total_steps`, or "cosine" decay to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
