"""Token ids to streamed text: incremental detokenisation with stop strings held back.

    stream = TextStream(tokenizer, stop=["\\n\\n"])
    piece = stream.push(token_id)      # new text safe to show ("" while a stop string may start)
    stream.stopped                     # True once a stop string appeared (text cut before it)
    rest = stream.flush()              # what was held back, at the end

The whole answer is decoded again after each token (ids -> text is not additive: a token may
complete a multi-byte character or change spacing), and only the new suffix is released. Text
that could be the start of a stop string is held until it is known not to be one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; the text now safe to release."""
        self.ids.append(int(token_id))
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        self.text = text
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._release(cut)
        return self._release(len(text) - self._held(text))

    def flush(self) -> str:
        """Everything not yet released (at the end of the answer)."""
        return self._release(len(self.text))

    def _decode(self) -> str:
        if self.tokenizer is None:  # no tokenizer: ids as text, one per piece
            return "".join(f"{i} " for i in self.ids)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts, if one has appeared past what was released."""
        hits = [i for s in self.stop if (i := text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that may begin a stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        piece, self.sent = self.text[self.sent: upto], upto
        return piece
