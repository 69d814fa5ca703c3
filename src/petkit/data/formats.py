"""The row layouts petkit reads, in one registry: each format's name, kind, columns, detector
and reader into a canonical row. Help texts, `--format`, errors and docs/data.md derive from it.

Canonical rows (what every reader returns; what encoders and objectives consume):

    kind            canonical row                                              formats
    classification  {"text": str, "label": str}  (label as text, indexed later) text-label
    instruction     {"prompt": str, "completion": str}                         prompt-completion, alpaca
    chat            {"messages": [{"role": "system"|"user"|"assistant",        messages, sharegpt
                                   "content": str}, ...]}
    preference      {"prompt": str, "chosen": str, "rejected": str}            preference
                    or, when the file holds message lists,
                    {"prompt": [messages before the answers],
                     "chosen": [assistant messages], "rejected": [assistant messages]}
    reference       {"prompt": str, "reference": str}  (GRPO / generation)     reference

A chat row has >= 1 assistant turn, a system message only first, text content in every turn and
no empty turn. A preference row's chosen differs from its rejected. `Task.format` names the
recognised format and `Task.kind` its kind.

Detection: a format matches when every required field finds a column (the first of its candidate
column names present in the file); among the matches, one whose columns include another match's
columns wins (prompt/chosen/rejected over nothing smaller; alpaca's instruction/input/output);
two matches left is an ambiguous layout, none an unknown one: both are a `ConfigError` listing the
accepted formats. `--format NAME` skips detection. A row the format cannot read is a `BadRow`
(reason text); `files.py` collects them with their line numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from petkit.core.errors import ConfigError
from petkit.data.row_values import SHAREGPT_ROLES, BadRow, Message, _label, _text, messages_of


@dataclass(frozen=True)
class Columns:
    """Which column of the user's file holds each field (the --*-column flags)."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"

    def fields(self, kind: str) -> tuple[str, str]:
        """The two columns a classification or instruction task reads."""
        return (self.text, self.label) if kind == "classification" else (self.prompt, self.completion)


@dataclass(frozen=True)
class Field:
    """A canonical field and the column names that may hold it, first match wins."""

    name: str
    candidates: Callable[[Columns], tuple[str, ...]]
    required: bool = True


Reader = Callable[[dict[str, Any], dict[str, str]], dict[str, Any]]


@dataclass(frozen=True)
class Format:
    """A row layout: its fields, its reader (raw row, {field: column} -> canonical row) and a
    one-line example (docs, errors)."""

    name: str
    kind: str
    fields: tuple[Field, ...]
    read: Reader
    example: str
    summary: str

    def resolve(self, found: set[str], columns: Columns) -> dict[str, str] | None:
        """{field: column} when every required field has a column in `found`, else None."""
        out = {}
        for f in self.fields:
            hit = next((c for c in f.candidates(columns) if c in found), None)
            if hit is None and f.required:
                return None
            if hit is not None:
                out[f.name] = hit
        return out

    def wanted(self, columns: Columns) -> str:
        """The columns it reads, for messages: "instruction, output[, input]"."""
        need = [" or ".join(repr(c) for c in f.candidates(columns)) for f in self.fields if f.required]
        optional = [f.candidates(columns)[0] for f in self.fields if not f.required]
        return ", ".join(need) + "".join(f" [+ {o!r}]" for o in optional)


# ---------------------------------------------------------------------------- field readers

def _read_text_label(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    return {"text": _text(row, cols["text"]).strip(), "label": _label(row, cols["label"])}


def _read_prompt_completion(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    return {"prompt": _text(row, cols["prompt"]).strip(), "completion": _text(row, cols["completion"])}


def _read_alpaca(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    instruction = _text(row, cols["instruction"]).strip()
    extra = _text(row, cols["input"], allow_empty=True).strip() if "input" in cols else ""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return {"prompt": prompt, "completion": _text(row, cols["output"])}


def _read_messages(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    return {"messages": messages_of(row, cols["messages"])}


def _read_sharegpt(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    return {"messages": messages_of(row, cols["conversations"], "from", "value", SHAREGPT_ROLES)}


def _read_reference(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    return {"prompt": _text(row, cols["prompt"]).strip(),
            "reference": _text(row, cols["reference"]).strip()}


def _side(row: dict[str, Any], column: str) -> str | list[Message]:
    """A preference cell: text, or a message list (also as a JSON list in a text cell; a text
    answer that merely starts with "[" stays text)."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.lstrip().startswith("[") else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list):
            return _text(row, column)
    return messages_of(row, column, need_assistant=False)


def _split_pair(prompt: list[Message], chosen: list[Message],
                rejected: list[Message]) -> dict[str, Any]:
    """Message-list pairs: the shared start (and a prompt the answers repeat) becomes the prompt."""
    for side in (chosen, rejected):
        if side[:len(prompt)] == prompt:
            del side[:len(prompt)]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    prompt, chosen, rejected = prompt + chosen[:shared], chosen[shared:], rejected[shared:]
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0]["role"] != "assistant":
            raise BadRow(f"{name!r} has no assistant answer after the prompt")
    if not prompt:
        raise BadRow("no prompt: give a 'prompt' column or start chosen/rejected with a user turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _read_preference(row: dict[str, Any], cols: dict[str, str]) -> dict[str, Any]:
    chosen, rejected = _side(row, cols["chosen"]), _side(row, cols["rejected"])
    if chosen == rejected:
        raise BadRow("chosen == rejected (nothing to prefer)")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise BadRow("chosen and rejected must both be text or both be message lists")
    prompt: str | list[Message] = ""
    if "prompt" in cols and row.get(cols["prompt"]) not in (None, "", []):
        prompt = _side(row, cols["prompt"]) if isinstance(chosen, list) else _text(row, cols["prompt"])
    if isinstance(chosen, str):
        if not prompt:
            raise BadRow(f"no {cols.get('prompt', 'prompt')!r} for text answers")
        return {"prompt": str(prompt).strip(), "chosen": chosen, "rejected": rejected}
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) and prompt \
        else list(prompt or [])
    return _split_pair(prompt_msgs, list(chosen), list(rejected))


# ---------------------------------------------------------------------------- the registry

def _fixed(*names: str) -> Callable[[Columns], tuple[str, ...]]:
    return lambda columns: names


def _prompt(columns: Columns) -> tuple[str, ...]:
    return (columns.prompt,)


def _question(columns: Columns) -> tuple[str, ...]:
    return (columns.prompt, "question") if columns.prompt != "question" else (columns.prompt,)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("text-label", "classification",
           (Field("text", lambda c: (c.text,)), Field("label", lambda c: (c.label,))),
           _read_text_label, '{"text": "a gripping, funny film", "label": "positive"}',
           "classification: text + label (words or integers)"),
    Format("prompt-completion", "instruction",
           (Field("prompt", _prompt), Field("completion", lambda c: (c.completion,))),
           _read_prompt_completion, '{"prompt": "Capital of France?", "completion": "Paris."}',
           "instruction: loss on the completion"),
    Format("alpaca", "instruction",
           (Field("instruction", _fixed("instruction")), Field("output", _fixed("output")),
            Field("input", _fixed("input"), required=False)),
           _read_alpaca, '{"instruction": "Translate to French.", "input": "cat", "output": "chat"}',
           "instruction: instruction (+ input) -> output"),
    Format("messages", "chat", (Field("messages", _fixed("messages")),), _read_messages,
           '{"messages": [{"role": "user", "content": "Hi"}, '
           '{"role": "assistant", "content": "Hello!"}]}',
           "chat: role/content turns, optional system first"),
    Format("sharegpt", "chat", (Field("conversations", _fixed("conversations")),), _read_sharegpt,
           '{"conversations": [{"from": "human", "value": "Hi"}, '
           '{"from": "gpt", "value": "Hello!"}]}',
           "chat: from/value turns (human, gpt, system)"),
    Format("preference", "preference",
           (Field("chosen", _fixed("chosen")), Field("rejected", _fixed("rejected")),
            Field("prompt", _prompt, required=False)),
           _read_preference,
           '{"prompt": "Review:", "chosen": "A joy to watch.", "rejected": "Dull."}',
           "preference pairs: prompt + chosen + rejected (text or message lists)"),
    Format("reference", "reference",
           (Field("prompt", _question), Field("reference", _fixed("reference", "answer"))),
           _read_reference, '{"prompt": "What is 7 + 5?", "reference": "12"}',
           "prompt + reference answer (rewards, exact-match evaluation)"),
)}
KINDS = tuple(dict.fromkeys(f.kind for f in FORMATS.values()))


def accepted(columns: Columns = Columns()) -> str:
    """The accepted layouts in one line: "text-label (text, label); messages (messages); ..."."""
    return "; ".join(f"{f.name} ({f.wanted(columns)})" for f in FORMATS.values())


def get_format(name: str) -> Format:
    """The registered format `name`; `ConfigError` with close names otherwise."""
    if name in FORMATS:
        return FORMATS[name]
    import difflib

    close = difflib.get_close_matches(name, FORMATS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"--format {name!r} is not a data format{hint}; formats: {', '.join(FORMATS)}")


@dataclass(frozen=True)
class Detected:
    """The recognised format and the {field: column} it reads."""

    format: Format
    columns: dict[str, str]

    def describe(self) -> str:
        """ "messages (column 'messages')" / "alpaca (instruction, output, input)"."""
        used = ", ".join(c if c == f else f"{c} as {f}" for f, c in self.columns.items())
        return f"{self.format.name} ({self.format.kind}; columns: {used})"


def _dominated(match: Detected, others: list[Detected]) -> bool:
    mine = set(match.columns.values())
    return any(mine < set(o.columns.values()) for o in others)


def _named(matches: list[Detected], columns: Columns) -> list[Detected]:
    """The matches that read the most of the columns the user named with --*-column flags
    (`--completion-column answer` settles prompt-completion against reference)."""
    defaults = Columns()
    named = {(f, getattr(columns, f)) for f in ("text", "label", "prompt", "completion")
             if getattr(columns, f) != getattr(defaults, f)}
    if not named or len(matches) < 2:
        return matches
    score = {id(m): len(named & set(m.columns.items())) for m in matches}
    best = max(score.values())
    return [m for m in matches if score[id(m)] == best]


def detect(where: str, found: list[str], columns: Columns, name: str = "auto") -> Detected:
    """The format of a file whose columns are `found` (or the named one, checked against them)."""
    present = set(found)
    if name != "auto":
        fmt = get_format(name)
        cols = fmt.resolve(present, columns)
        if cols is None:
            raise ConfigError(f"{where} is not in --format {name} layout: it needs columns "
                              f"{fmt.wanted(columns)} (its columns: {', '.join(found)})")
        return Detected(fmt, cols)
    matches = [Detected(f, c) for f in FORMATS.values()
               if (c := f.resolve(present, columns)) is not None]
    matches = [m for m in matches if not _dominated(m, matches)]
    matches = _named(matches, columns)
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(m.describe() for m in matches)
        raise ConfigError(f"{where}: ambiguous layout, it fits {names}; choose one with --format "
                          f"NAME ({', '.join(FORMATS)})")
    raise ConfigError(_unknown(where, found, columns))


def _unknown(where: str, found: list[str], columns: Columns) -> str:
    """Today's message for a text/label or prompt/completion file, then the other layouts."""
    present = set(found)
    instruction = [c for c in columns.fields("instruction") if c in present]
    kind = "instruction" if instruction and not any(
        c in present for c in columns.fields("classification")) else "classification"
    missing = [c for c in columns.fields(kind) if c not in present]
    return (f"{where} has no column {' or '.join(repr(m) for m in missing)} (its columns: "
            f"{', '.join(found)}); name yours with --text-column/--label-column (classification) "
            f"or --prompt-column/--completion-column (instruction), or use a layout petkit "
            f"recognises (--format NAME): {accepted(columns)}")
