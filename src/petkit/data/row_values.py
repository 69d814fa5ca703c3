"""Reading one value of a user's row: text, labels, lists, chat messages (role/content or
ShareGPT from/value). A value the format cannot read is a `BadRow` whose text is the reason;
`formats.py` builds its readers from these."""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant"}


class BadRow(ValueError):
    """A row the format cannot read; its text is the reason ("message 2 has no 'role'")."""


def _text(row: dict[str, Any], column: str, allow_empty: bool = False) -> str:
    """A text cell: numbers become text; None, blank (unless allowed: then a missing cell is "")
    and lists are `BadRow`."""
    if column not in row and allow_empty:
        return ""
    if column not in row:
        raise BadRow(f"no {column!r} (it has: {', '.join(row)})")
    value = row[column]
    is_text = value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if not is_text:
        raise BadRow(f"{column!r} is {type(value).__name__}, not text")
    text = "" if value is None else str(value)
    if not allow_empty and not text.strip():
        raise BadRow(f"empty {column!r}")
    return text


def label_key(value: Any) -> str | None:
    """A label value as text: 1, 1.0 and "1" are all "1"; None or blank is None."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _label(row: dict[str, Any], column: str) -> str:
    if column not in row:
        raise BadRow(f"no {column!r} (it has: {', '.join(row)})")
    key = label_key(row[column])
    if key is None:
        raise BadRow(f"empty {column!r}")
    return key


def _list(row: dict[str, Any], column: str) -> list[Any]:
    """A list cell; a CSV cell holding a JSON list is read as one."""
    value = row.get(column)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadRow(f"{column!r} is not a valid JSON list ({err.msg})") from err
    if hasattr(value, "tolist"):  # numpy arrays out of parquet / datasets
        value = value.tolist()
    if not isinstance(value, list):
        raise BadRow(f"{column!r} is {type(value).__name__}, not a list of messages")
    return value


def _message(item: Any, i: int, role_key: str, content_key: str,
             roles: dict[str, str]) -> Message:
    if not isinstance(item, dict):
        raise BadRow(f"message {i} is {type(item).__name__}, not an object")
    if role_key not in item:
        raise BadRow(f"message {i} has no {role_key!r}")
    role = roles.get(str(item[role_key]).lower())
    if role is None:
        raise BadRow(f"message {i} has {role_key!r} = {item[role_key]!r}, not one of "
                     f"{', '.join(sorted(set(roles)))}")
    content = item.get(content_key)
    if not isinstance(content, str):
        raise BadRow(f"message {i} ({role}): {content_key!r} is "
                     f"{'missing' if content is None else type(content).__name__}, not text")
    if not content.strip():
        raise BadRow(f"message {i} ({role}): empty {content_key!r}")
    return {"role": role, "content": content}


def check_conversation(messages: list[Message], need_assistant: bool = True) -> list[Message]:
    """`messages` when it is a conversation petkit trains on, else `BadRow` saying why."""
    if not messages:
        raise BadRow("no messages")
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRow("a system message after the first turn")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn")
    return messages


def messages_of(row: dict[str, Any], column: str, role_key: str = "role",
                content_key: str = "content", roles: dict[str, str] | None = None,
                need_assistant: bool = True) -> list[Message]:
    """The cell's list of messages, each checked (numbered from 1)."""
    roles = roles or {r: r for r in ROLES}
    items = _list(row, column)
    return check_conversation([_message(m, i, role_key, content_key, roles)
                               for i, m in enumerate(items, 1)], need_assistant)


# ---------------------------------------------------------------------------- format readers
