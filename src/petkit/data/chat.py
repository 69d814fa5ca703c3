"""Conversations -> token ids and labels through a chat template, with the loss where asked.

The template is the model's own (`tokenizer.chat_template`), a named one (`--chat-template
chatml|llama3|zephyr`) or a Jinja file. A conversation is rendered incrementally: with R_k the
text of its first k messages and G_k the same plus the generation prompt, message k's text is
R_k -> R_k+1, and an assistant message splits into its header R_k -> G_k (never trained) and its
answer G_k -> R_k+1 (the reply and the template's end-of-turn text, e.g. "Hello!<|im_end|>\\n").
Each piece is tokenised on its own and the ids laid end to end, so every token belongs to exactly
one message and the masks are exact; a template whose renderings are not prefixes of each other
is refused with a `ConfigError`.

`--train-on`: `assistant` (default) labels every answer, `last` only the last answer kept, `all`
every token. A conversation longer than `--max-length` keeps its messages up to the last
assistant turn that fits (cut at a turn boundary); when not even the first answer fits, the
first answer is kept with the end of what precedes it (`encode.fit_prompt_answer`).
`ChatStats` counts both, for the run's first lines.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petkit.core.errors import ConfigError
from petkit.data.row_values import Message

TRAIN_ON = ("assistant", "all", "last")

TEMPLATES: dict[str, str] = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
               "'<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{% if messages %}{{ bos_token }}{% endif %}{% for m in messages %}"
               "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + "
               "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "zephyr": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + "
               "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


@dataclass(frozen=True)
class Template:
    """A chat template's Jinja text and how it was chosen (for the run's first lines)."""

    text: str
    origin: str


def resolve_template(tokenizer: Any, name: str | None) -> Template:
    """The named template, a Jinja file, or (None / "model") the tokenizer's own; a tokenizer
    without one falls back to chatml, and says so."""
    if name in (None, "", "model"):
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return Template(own, "the model's own chat template")
        return Template(TEMPLATES["chatml"], "chatml (the model has no chat template)")
    if name in TEMPLATES:
        return Template(TEMPLATES[name], f"{name} (--chat-template)")
    path = Path(name)
    if path.is_file():
        return Template(path.read_text(encoding="utf-8"), f"{path} (--chat-template)")
    close = difflib.get_close_matches(name, TEMPLATES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"--chat-template {name!r} is neither a template name{hint} ("
                      f"{', '.join(['model', *TEMPLATES])}) nor a Jinja file")


def _render(tokenizer: Any, template: Template, messages: list[Message], generation: bool) -> str:
    if not messages and not generation:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
        raise ConfigError(f"chat template {template.origin} cannot render this conversation: "
                          f"{err}") from err


def _piece(outer: str, inner: str, template: Template) -> str:
    if not outer.startswith(inner):
        raise ConfigError(f"chat template {template.origin} does not render conversations "
                          f"incrementally (a longer conversation does not start with a shorter "
                          f"one's text), so its answers cannot be masked; use --chat-template "
                          f"{' or '.join(TEMPLATES)}")
    return outer[len(inner):]


@dataclass(frozen=True)
class Piece:
    """Token ids of one part of a rendered conversation: which message, and whether an answer."""

    message: int
    answer: bool
    ids: list[int]


def pieces(messages: list[Message], tokenizer: Any, template: Template) -> list[Piece]:
    """The conversation as template pieces in order (see the module doc)."""
    out: list[Piece] = []
    done = ""
    for k, message in enumerate(messages):
        full = _render(tokenizer, template, messages[:k + 1], False)
        if message["role"] == "assistant":
            header = _render(tokenizer, template, messages[:k], True)
            parts = [(_piece(header, done, template), False), (_piece(full, header, template), True)]
        else:
            parts = [(_piece(full, done, template), False)]
        out += [Piece(k, answer, _ids(tokenizer, text)) for text, answer in parts if text]
        done = full
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _labels(kept: list[Piece], train_on: str, first_trained: int) -> list[int]:
    from petkit.data.encode import IGNORE_INDEX  # torch: only once data is encoded

    answers = [i for i, p in enumerate(kept) if p.answer and p.message >= first_trained]
    chosen = set(answers[-1:]) if train_on == "last" else set(answers)
    out: list[int] = []
    for i, p in enumerate(kept):
        trained = train_on == "all" and p.message >= first_trained or i in chosen
        out += p.ids if trained else [IGNORE_INDEX] * len(p.ids)
    return out


def _cut(parts: list[Piece], max_length: int, first_trained: int) -> tuple[list[Piece], str]:
    """The pieces kept within max_length and how ("", "turn", "inside")."""
    from petkit.data.encode import fit_prompt_answer  # torch: only once data is encoded
    if sum(len(p.ids) for p in parts) <= max_length:
        return parts, ""
    total, best = 0, 0
    for i, p in enumerate(parts):
        total += len(p.ids)
        if total > max_length:
            break
        if p.answer and p.message >= first_trained:
            best = i + 1
    if best:
        return parts[:best], "turn"
    first = next((i for i, p in enumerate(parts) if p.answer and p.message >= first_trained), None)
    if first is None:
        return parts, "inside"  # nothing to train on: the caller reports the row
    before = [t for p in parts[:first] for t in p.ids]
    before, answer = fit_prompt_answer(before, parts[first].ids, max_length)
    return [Piece(-1, False, before), Piece(parts[first].message, True, answer)], "inside"


def encode_conversation(messages: list[Message], tokenizer: Any, template: Template, *,
                        max_length: int, train_on: str = "assistant",
                        first_trained: int = 0) -> tuple[dict[str, list[int]], str]:
    """{"input_ids", "attention_mask", "labels"} of one conversation, and how it was cut ("",
    "turn", "inside"). Messages before `first_trained` (a preference pair's prompt) never train."""
    kept, how = _cut(pieces(messages, tokenizer, template), max_length, first_trained)
    ids = [t for p in kept for t in p.ids][:max_length]
    labels = _labels(kept, train_on, first_trained)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, how


@dataclass
class ChatStats:
    """How many conversations were cut to --max-length, and where."""

    rows: int = 0
    at_turn: int = 0
    inside: int = 0
    untrained: list[int] = field(default_factory=list)

    def note(self, split: str, max_length: int) -> str | None:
        """The line a run prints about cut rows (None when nothing was cut)."""
        if not (self.at_turn or self.inside):
            return None
        return (f"{split}: {self.at_turn + self.inside:,} of {self.rows:,} conversations longer "
                f"than --max-length {max_length} were cut ({self.at_turn:,} at a turn boundary, "
                f"{self.inside:,} inside their first answer)")


def as_messages(row: dict[str, Any]) -> list[Message]:
    """A chat row's messages; an instruction row as one user and one assistant turn."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]}]


def encode_chat(rows: list[dict[str, Any]], tokenizer: Any, *, max_length: int,
                template: str | None = None,
                train_on: str = "assistant") -> tuple[list[dict[str, list[int]]], ChatStats]:
    """Chat (or instruction) rows -> encoded examples with labels on the trained tokens only."""
    from petkit.data.encode import IGNORE_INDEX  # torch: only once data is encoded
    if train_on not in TRAIN_ON:
        raise ConfigError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    chosen = resolve_template(tokenizer, template)
    stats, out = ChatStats(rows=len(rows)), []
    for i, row in enumerate(rows):
        encoded, how = encode_conversation(as_messages(row), tokenizer, chosen,
                                           max_length=max_length, train_on=train_on)
        stats.at_turn += how == "turn"
        stats.inside += how == "inside"
        if all(y == IGNORE_INDEX for y in encoded["labels"]):
            stats.untrained.append(i)
        out.append(encoded)
    return out, stats
