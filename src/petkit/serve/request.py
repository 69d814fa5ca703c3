"""What a caller hands the engine (`GenerationRequest`) and gets back (`Handle`), and the engine's
refusals (`QueueFull`, `UnknownAdapter`)."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from petkit.core.errors import ConfigError, PetkitError


class QueueFull(PetkitError):
    """The engine's waiting queue is at `max_queue`: retry later."""


class UnknownAdapter(PetkitError, KeyError):
    """A request names an adapter the engine does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class GenerationRequest:
    """One prompt to answer: exactly one of `prompt_ids`, `messages` (chat, the tokenizer's template
    applied) or `prompt` (raw text); `adapter` None is the base."""
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        given = [k for k in ("prompt_ids", "messages", "prompt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"a request needs exactly one of prompt_ids, messages or prompt; got {given or 'none'}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]


_END = object()


class Handle:
    """A submitted request: iterate for its text pieces as they come (blocking, thread-safe)."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int]) -> None:
        self.request, self.prompt_ids = request, prompt_ids
        prompt_tokens = len(prompt_ids)
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: str | None = None
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
        self.token_ids: list[int] = []
        self.text = ""
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self._pieces.get()
            if piece is _END:
                self._pieces.put(_END)  # a second iteration ends at once too
                return
            yield piece

    def cancel(self) -> None:
        """Stop generating: the row leaves the batch at the next step (no-op once finished)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> str:
        """The whole answer (blocks until finished)."""
        self._done.wait(timeout)
        return self.text

    # ---- the engine's side ----
    def token(self, token_id: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.append(token_id)
        self.usage["completion_tokens"] += 1
        self.usage["total_tokens"] += 1

    def piece(self, text: str) -> None:
        if text:
            self.text += text
            self._pieces.put(text)

    def finish(self, reason: str, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._pieces.put(_END)
