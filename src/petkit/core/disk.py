"""Files on disk, measured one way everywhere: a file's sha256, a folder's size, bytes for people."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (adapter and checkpoint files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 for a missing folder)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def format_bytes(n: float | None, digits: int = 1) -> str:
    """`n` bytes as B / KiB / MiB / GiB with `digits` decimals; "–" for None."""
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"
