"""petkit's cache of built model folders (``$PETKIT_CACHE``, default ``~/.cache/petkit``): a
folder is built into a temporary sibling and renamed into place, so a crash never leaves half a
cache, and a marker file written last says what it was built from."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Written last into a cache folder; a folder without it (or with another source) is rebuilt.
CACHE_MARKER = "petkit-cache.json"


def cache_root() -> Path:
    """Root of petkit's cache: ``$PETKIT_CACHE`` or ``~/.cache/petkit``."""
    return Path(os.environ.get("PETKIT_CACHE") or Path.home() / ".cache" / "petkit")


def cache_is_valid(folder: Path, source: dict[str, str]) -> bool:
    """Whether `folder` is complete and was built from `source` (its marker says so)."""
    marker = folder / CACHE_MARKER
    try:
        return json.loads(marker.read_text()) == source
    except (OSError, ValueError):
        return False


def write_atomically(
    target: Path, build: Callable[[Path], None], done: Callable[[Path], bool]
) -> None:
    """Build into a temp dir next to `target`, then rename it into place.

    If another process finished `target` meanwhile (`done` says so), its copy is kept and ours is
    dropped, so a reader of the finished folder never sees it vanish.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if done(target):
            return
        if target.exists():  # stale or incomplete
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not done(target):  # lost a race to a writer that did finish: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
