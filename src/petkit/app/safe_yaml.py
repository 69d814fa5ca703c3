"""YAML from users and shared folders, read safely and within bounds.

`load_yaml_file` refuses a file above `MAX_YAML_BYTES` (checked with `stat`, before reading);
`load_yaml` parses with a `yaml.SafeLoader` subclass (no tag constructs a Python object, so a
recipe can never import or run code: `!!python/object` is an error) that also bounds what a
small text can make large: nesting depth, node count, alias uses (a "billion laughs" bomb) and
scalar length, and the size of the document once its aliases are expanded. Every refusal is a one-line `ConfigError` naming the file and the line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from petkit.core.errors import ConfigError

MAX_YAML_BYTES = 1 << 20
MAX_DEPTH, MAX_NODES, MAX_ALIASES, MAX_SCALAR = 64, 100_000, 100, 64 << 10


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader counting nodes, aliases and depth while it composes the document."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = self.nodes = self.aliases = 0

    def _refuse(self, what: str) -> None:
        mark = self.peek_event().start_mark if self.check_event() else None
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise yaml.YAMLError(f"{what}{line}")

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - yaml's hook
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                self._refuse(f"more than {MAX_ALIASES} aliases (*name): refused as a possible "
                             "alias bomb")
        elif self.check_event(yaml.ScalarEvent):
            if len(self.peek_event().value) > MAX_SCALAR:
                self._refuse(f"a value longer than {MAX_SCALAR:,} characters")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self._refuse(f"more than {MAX_NODES:,} values")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self._refuse(f"nesting deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, where: object) -> Any:
    """Parse YAML `text` within the bounds above; `ConfigError` naming `where`."""
    if _flow_depth(text) > MAX_DEPTH:  # before PyYAML, whose scanner is quadratic in it
        raise ConfigError(f"cannot read {where}: brackets nest deeper than {MAX_DEPTH} levels")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot read {where}: {_one_line(err)}") from None
    except RecursionError:
        raise ConfigError(f"cannot read {where}: nesting too deep") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path, what: str = "recipe", max_bytes: int = MAX_YAML_BYTES) -> Any:
    """`load_yaml` of a file whose size is checked before it is read."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(f"{what} {path} is {size:,} bytes; {what}s are at most "
                              f"{max_bytes:,} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None
    return load_yaml(text, f"{what} {path}")


def _flow_depth(text: str) -> int:
    """Deepest nesting of [ ] and { } in `text` (brackets inside quotes count too: an upper
    bound, exact for ordinary recipes)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """Values `node` stands for once every alias is expanded (what a consumer walking the
    result would meet); a YAMLError past `MAX_NODES` or on a node that contains itself."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise yaml.YAMLError(f"an alias refers to a value that contains it (line {node.start_mark.line + 1})")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, open_) + _expanded_size(v, memo, open_) for k, v in node.value)
    open_.discard(key)
    if size > MAX_NODES:
        raise yaml.YAMLError(f"more than {MAX_NODES:,} values once its aliases (*name) are expanded "
                             f"(line {node.start_mark.line + 1}): refused as a possible alias bomb")
    memo[key] = size
    return size


def _one_line(err: yaml.YAMLError) -> str:
    return " ".join(str(err).split())
