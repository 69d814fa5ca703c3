"""A split that records every read and refuses reads until it is opened: the test-set guard.

The fair protocol says the test split is never used for selection. `RecordedSplit` makes that
checkable: while sealed, any read of an example (indexing, slicing, iterating) raises and is
logged as refused; `open(reason)` unseals it and every later read is logged. Its length is not
content and stays readable, so a subset can be chosen by index without looking at examples.

    test = RecordedSplit(task.test)         # sealed
    ... train, select on validation ...
    test.open("final evaluation")           # logged
    encode(list(test))                      # logged as a read
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

from petkit.core.errors import PetkitError


class SealedSplitError(PetkitError):
    """A sealed split (the test set before final evaluation) was read."""


class RecordedSplit(Sequence[dict]):
    """Read-logging, sealable view of a list of examples."""

    def __init__(self, examples: Sequence[dict], name: str = "test") -> None:
        """Wrap `examples` (not copied); starts sealed with an empty log."""
        self._examples = examples
        self.name = name
        self.log: list[str] = []
        self.opened_for: str | None = None

    @property
    def opened(self) -> bool:
        """True once `open` was called."""
        return self.opened_for is not None

    @property
    def reads(self) -> list[str]:
        """Log entries of reads (allowed or refused), in order."""
        return [e for e in self.log if e.startswith(("read", "refused"))]

    def open(self, reason: str) -> RecordedSplit:
        """Unseal for `reason` (e.g. "final evaluation"); returns self."""
        self.log.append(f"open: {reason}")
        self.opened_for = reason
        return self

    def mark(self, event: str) -> None:
        """Add a milestone (e.g. "training done") to the log, so reads can be placed in time."""
        self.log.append(f"mark: {event}")

    def view(self, indices: Sequence[int] | None = None) -> RecordedSplit:
        """A new sealed split over `indices` (default all) with its own log; reads nothing."""
        chosen = self._examples if indices is None else [self._examples[i] for i in indices]
        return RecordedSplit(chosen, self.name)

    def _read(self, what: str) -> None:
        if self.opened_for is None:
            self.log.append(f"refused: {what}")
            raise SealedSplitError(f"the {self.name} split is sealed until final evaluation; "
                                   f"refused to read {what}")
        self.log.append(f"read: {what}")

    def __len__(self) -> int:
        """Number of examples (not content: allowed while sealed)."""
        return len(self._examples)

    @overload
    def __getitem__(self, index: int) -> dict: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index: int | slice) -> Any:
        """One example or a list of them; logged, refused while sealed."""
        self._read(f"[{index.start}:{index.stop}]" if isinstance(index, slice) else f"[{index}]")
        return list(self._examples[index]) if isinstance(index, slice) else self._examples[index]

    def __iter__(self) -> Iterator[dict]:
        """All examples; logged once, refused while sealed."""
        self._read("all (iterate)")
        return iter(list(self._examples))

    def __repr__(self) -> str:
        """Shows size and state, never content."""
        state = f"open for {self.opened_for!r}" if self.opened else "sealed"
        return f"RecordedSplit({self.name!r}, {len(self)} examples, {state})"
