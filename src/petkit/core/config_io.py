"""Building a config dataclass from a plain mapping (JSON, YAML, CLI), one way for every config.

    dataclass_from_dict(LoraConfig, {"r": 8, "alpah": 16}, "LoraConfig")
    # ConfigError: LoraConfig has no field 'alpah' (did you mean 'alpha'?); fields: [...]

Unknown keys are rejected naming the closest known names (difflib); each value is checked
against its field's annotation (an int for a float field is fine, a bool for an int is not; a
list for a tuple; a mapping for a nested dataclass, which builds it). Range checks stay in each
dataclass's `__post_init__`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str, *,
                        ignore: Collection[str] = (), extra: Collection[str] = ()) -> T:
    """`cls(**data)` after checking keys and types; `where` names the config in errors.

    None builds the defaults. `ignore`: keys dropped silently (e.g. "method", "name");
    `extra`: accepted keyword arguments that are not fields (deprecated flat keys).
    """
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of its fields, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in ignore}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, [*fields, *extra], where)
    hints = _hints(cls)
    for name, value in data.items():
        if name in fields and name in hints and not _matches(value, hints[name]):
            raise ConfigError(f"{where}.{name} must be {_describe(hints[name])}, got {value!r}")
    return cls(**data)


def check_keys(data: Mapping[str, Any], known: Collection[str], where: str) -> None:
    """ConfigError for keys of `data` not in `known`, with the close names of each."""
    unknown = [k for k in data if k not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=3, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(key))
    raise ConfigError(f"{where} has no field(s) {', '.join(hints)}; fields: {sorted(known)}")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve is not checked here
        return {}


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is None or annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    kind = origin or annotation
    if kind in (list, tuple, Collection, Sequence):
        return isinstance(value, (list, tuple))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, (kind, Mapping))
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True


def _describe(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "None"
    kind = typing.get_origin(annotation) or annotation
    if kind in (list, tuple):
        return "a list"
    return getattr(kind, "__name__", str(kind))
