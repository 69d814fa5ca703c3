"""Reward and metric functions named on the command line: `module:function[=weight]`.

`load_scorers` prints the module's file before importing it (a reward is user code that runs
inside the training process), then checks the function is callable. `Scorer.score` calls it as
`fn(prompts, completions, rows)` and checks what comes back: one finite number per completion.
A function that raises, returns the wrong number of values or a NaN / inf is a `RewardError`
naming the data row (a failing batch is re-scored row by row to find it).
Several rewards add up with their weights (`--reward a:f=0.5 --reward b:g`: 0.5 f + 1.0 g).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from petkit.core.errors import ConfigError
from petkit.data.rewards import METRICS

ScoreFn = Callable[[list[str], list[str], list[dict[str, Any]]], Sequence[float]]
Echo = Callable[[str], None]


class RewardError(ConfigError):
    """A reward or metric function failed or returned something unusable."""


@dataclass
class Scorer:
    """One named function and its weight."""

    spec: str
    fn: ScoreFn
    weight: float = 1.0

    def score(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]],
              row_ids: Sequence[int]) -> list[float]:
        """One finite float per completion; `RewardError` naming the row otherwise."""
        try:
            values = list(self.fn(prompts, completions, rows))
        except Exception as err:  # user code: any exception becomes one clear line
            bad = self._failing_row(prompts, completions, rows, row_ids)
            where = f"data row {bad}" if bad is not None else \
                f"the batch of data rows {sorted(set(row_ids))}"
            raise RewardError(f"{self.spec} raised {type(err).__name__}: {err} on "
                              f"{where}") from err
        if len(values) != len(completions):
            raise RewardError(f"{self.spec} returned {len(values)} values for "
                              f"{len(completions)} completions (data rows "
                              f"{sorted(set(row_ids))}); it must return one per completion")
        numbers = [_number(v) for v in values]
        for value, number, row in zip(values, numbers, row_ids):
            if not math.isfinite(number):
                raise RewardError(f"{self.spec} returned {value!r} for data row {row}; "
                                  "rewards must be finite numbers")
        return numbers

    def _failing_row(self, prompts: list[str], completions: list[str],
                     rows: list[dict[str, Any]], row_ids: Sequence[int]) -> int | None:
        """The first data row on which the function raises when called alone."""
        for i, row in enumerate(row_ids):
            try:
                self.fn(prompts[i:i + 1], completions[i:i + 1], rows[i:i + 1])
            except Exception:  # noqa: BLE001 - locating the row only
                return int(row)
        return None


def _number(value: Any) -> float:
    """`value` as a float (Python, numpy or 0-dim torch numbers); NaN for anything else."""
    if isinstance(value, (bool, str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_spec(spec: str) -> tuple[str, str, float]:
    """'module:function[=weight]' -> (module, function, weight)."""
    target, _, weight_text = spec.partition("=")
    module, _, function = target.partition(":")
    if not module or not function:
        raise ConfigError(f"--reward / --metric {spec!r} must look like module:function or "
                          "module:function=weight (e.g. petkit.data.rewards:exact_number)")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError as err:
        raise ConfigError(f"--reward {spec!r}: weight {weight_text!r} is not a number") from err
    if not math.isfinite(weight):
        raise ConfigError(f"--reward {spec!r}: weight must be finite")
    return module, function, weight


def load_scorer(spec: str, echo: Echo = print) -> Scorer:
    """Import `module` (its file printed first; the working folder is searched too) and take
    `function` from it."""
    spec = METRICS.get(spec, spec)
    module_name, function, weight = parse_spec(spec)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a reward file beside the data, as users keep them
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{spec}: cannot find module {module_name!r}: {err}") from err
    if found is None:
        raise ConfigError(f"{spec}: no module {module_name!r} (a .py file in the working folder "
                          "or an installed module)")
    echo(f"{spec}: importing {module_name} from {found.origin}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # user code at import time
        raise ConfigError(f"{spec}: importing {found.origin} failed: "
                          f"{type(err).__name__}: {err}") from err
    fn = getattr(module, function, None)
    if not callable(fn):
        names = sorted(n for n in vars(module) if callable(vars(module)[n])
                       and not n.startswith("_"))
        raise ConfigError(f"{spec}: {module_name} has no function {function!r} "
                          f"(functions: {', '.join(names) or 'none'})")
    return Scorer(spec, fn, weight)


def load_scorers(specs: Sequence[str], echo: Echo = print) -> list[Scorer]:
    """`load_scorer` of each spec; at least one."""
    if not specs:
        raise ConfigError("--objective grpo needs at least one --reward module:function "
                          "(e.g. --reward petkit.data.rewards:exact_number)")
    return [load_scorer(s, echo) for s in specs]


def total_reward(scorers: Sequence[Scorer], prompts: list[str], completions: list[str],
                 rows: list[dict[str, Any]], row_ids: Sequence[int]) -> torch.Tensor:
    """(N,) weighted sum of every scorer's values."""
    total = torch.zeros(len(completions))
    for scorer in scorers:
        values = scorer.score(prompts, completions, rows, row_ids)
        total += scorer.weight * torch.tensor(values)
    return total
