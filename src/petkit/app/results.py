"""`results.json`: what a `petkit train` run measured, kept in its folder beside the adapter.

Test metrics before and after training, the command that ran, the versions that ran it, and
where the time went (loading, the two test passes, training), so a run folder answers "how well
did it do" without scrolling back through a terminal.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from petkit.core.durable import current_umask
from petkit.core.version import __version__

VERSIONED = ("torch", "transformers", "peft", "accelerate", "safetensors")


def versions() -> dict[str, str]:
    """petkit, Python and the installed versions of the libraries a run depends on."""
    found = {"petkit": __version__, "python": platform.python_version()}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_results(path: Path, report: Any, times: dict[str, float], command: list[str] | None,
                  test_examples: int) -> Path:
    """Write `path` atomically (a reader never sees half a file) from a `RunReport`."""
    result = report.result
    data = {
        "command": command if command is not None else None,
        "test_examples": test_examples,
        "before": report.before,
        "after": report.after,
        "steps": result.steps,
        "best": ({"step": result.best_step, "metric": result.metric, "value": result.best_metric}
                 if result.best_metric is not None else None),
        "adapter": str(result.adapter_path) if result.adapter_path else None,
        "adapter_bytes": report.adapter_bytes,
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "seconds": {**{k: round(v, 2) for k, v in times.items()},
                    "total_s": round(report.seconds, 2)},
        "versions": versions(),
        "recipe": report.recipe.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    return path
