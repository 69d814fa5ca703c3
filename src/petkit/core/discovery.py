"""Registries that fill themselves: the first lookup imports the modules that register entries.

    DATASETS = Discovered("dataset", builtin="petkit.data.embedded", group="petkit.datasets")
    DATASETS.add("rotten-tomatoes", entry)       # in the entry's own module, on import
    "rotten-tomatoes" in DATASETS                 # imports the registering modules once

Discovery imports the `builtin` package and each of its modules whose name does not start with
"_" (one file per entry), then every module a package declares under the entry-point `group`
(a plugin: `[project.entry-points."petkit.datasets"] mine = "mypkg.data"`). Registration is
thus one explicit step of the registry, never a side effect of importing the facade, and `core`
names no module above it (the builtin package is a string).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, TypeVar

from petkit.core.errors import ConfigError, did_you_mean

V = TypeVar("V")


class Discovered(dict[str, V]):
    """Entries by name, discovered on the first lookup (module docstring)."""

    def __init__(self, what: str, builtin: str, group: str) -> None:
        super().__init__()
        self.what, self.builtin, self.group = what, builtin, group
        self.loaded = False

    def discover(self) -> None:
        """Import the registering modules once (a module being imported may register itself)."""
        if self.loaded:
            return
        self.loaded = True
        package = importlib.import_module(self.builtin)
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if not info.name.startswith("_") and info.name != "family":
                importlib.import_module(f"{self.builtin}.{info.name}")
        for entry in entry_points(group=self.group):
            if entry.value != self.builtin:
                importlib.import_module(entry.value)

    def add(self, name: str, value: V) -> V:
        """Register `value` under `name` (no discovery: registering is part of it)."""
        if dict.__contains__(self, name):
            raise ValueError(f"{self.what} {name!r} is registered twice")
        dict.__setitem__(self, name, value)
        return value

    def lookup(self, name: str) -> V:
        """The entry of `name`; ConfigError naming close and known names when there is none."""
        if name not in self:
            raise ConfigError(f"unknown {self.what} {name!r}{did_you_mean(name, self)}; known: "
                              f"{self.names()}")
        return self[name]

    def names(self) -> str:
        """The registered names, comma-separated, in registration order (for messages)."""
        return ", ".join(self)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return super().__contains__(name)

    def __getitem__(self, name: str) -> V:
        self.discover()
        return super().__getitem__(name)

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return super().__iter__()

    def __len__(self) -> int:
        self.discover()
        return super().__len__()

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        self.discover()
        return super().get(name, default)

    def keys(self):  # type: ignore[no-untyped-def]
        self.discover()
        return super().keys()

    def values(self):  # type: ignore[no-untyped-def]
        self.discover()
        return super().values()

    def items(self):  # type: ignore[no-untyped-def]
        self.discover()
        return super().items()
