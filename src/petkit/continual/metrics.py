"""Continual-learning metrics from the accuracy matrix `a[t][i]` (accuracy on task i after task t).

With T tasks and the last row `a[T-1]` (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018):

    average accuracy  ACC = mean_i a[T-1][i]
    forgetting        F   = mean_{i<T-1} ( max_{i<=t<T-1} a[t][i] - a[T-1][i] )
    backward transfer BWT = mean_{i<T-1} ( a[T-1][i] - a[i][i] )

Entries for tasks not yet seen (t < i) are None. A matrix whose earlier rows are all None (the
multitask upper bound trains everything at once) has an average accuracy but no forgetting or
backward transfer (None).
"""

from __future__ import annotations

from collections.abc import Sequence

from petkit.core.errors import ConfigError

Matrix = Sequence[Sequence[float | None]]


def _check(matrix: Matrix) -> int:
    """The number of tasks T; ConfigError unless the matrix is T x T with a full last row."""
    size = len(matrix)
    if size == 0 or any(len(row) != size for row in matrix):
        raise ConfigError(f"accuracy matrix must be T x T with T >= 1, got rows of "
                          f"{[len(r) for r in matrix]}")
    if any(v is None for v in matrix[-1]):
        raise ConfigError("accuracy matrix: the last row (after the last task) must be complete")
    return size


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over all tasks after the last one."""
    size = _check(matrix)
    return sum(float(v) for v in matrix[-1] if v is not None) / size


def _earlier(matrix: Matrix, task: int) -> list[float]:
    """Accuracies on `task` measured after it was learned and before the last task."""
    return [float(row[task]) for row in matrix[task:-1] if row[task] is not None]


def forgetting(matrix: Matrix) -> float | None:
    """Mean drop from each earlier task's best accuracy to its final one (None if undefined)."""
    size = _check(matrix)
    drops = [max(_earlier(matrix, i)) - float(matrix[-1][i])  # type: ignore[arg-type]
             for i in range(size - 1) if _earlier(matrix, i)]
    return sum(drops) / len(drops) if drops else None


def backward_transfer(matrix: Matrix) -> float | None:
    """Mean change from just after learning each earlier task to the end (negative: forgot)."""
    size = _check(matrix)
    changes = [float(matrix[-1][i]) - float(matrix[i][i])  # type: ignore[arg-type]
               for i in range(size - 1) if matrix[i][i] is not None]
    return sum(changes) / len(changes) if changes else None


def summarise(matrix: Matrix) -> dict[str, float | None]:
    """{"average_accuracy", "forgetting", "backward_transfer"} of one matrix."""
    return {"average_accuracy": average_accuracy(matrix), "forgetting": forgetting(matrix),
            "backward_transfer": backward_transfer(matrix)}
