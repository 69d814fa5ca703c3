"""Packages whose public names load on first use (`module.__getattr__`, PEP 562).

    __getattr__, __dir__ = lazy_exports(__name__, {"run": "petkit.benchmark.harness"})

A package that re-exports its modules' names this way costs nothing to import, so the command
line's `--help` and `import petkit` load no regime (and not torch) until a name is used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def _load(spec: str, name: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute or name)


def lazy_exports(package: str, table: dict[str, str], more: str | None = None,
                 more_suffix: str = "") -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: `table` maps a public name to "module" (the
    same name there) or "module:attribute"; `more` names a function returning further
    {name: value} (the facade's `<Method>Config` classes, from the method registry), asked only
    for a name the table lacks that ends with `more_suffix` (so `from petkit import cli` and
    `hasattr` probes of submodules never load the registry). A loaded name is cached."""

    def extra() -> dict[str, Any]:
        return _load(more, "")() if more else {}

    def __getattr__(name: str) -> Any:
        if name == "__all__":
            return sorted({*table, *extra()})
        if name in table:
            value = _load(table[name], name)
        elif (more and name.endswith(more_suffix) and not name.startswith("__")
              and name in (found := extra())):
            value = found[name]
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table, *extra()})

    return __getattr__, __dir__
