"""Full disks: a save that runs out of space (or hits a file-size limit) is a `DiskFullError`
naming the folder, the space needed and what is free, after its partial files are removed.

`is_disk_full` recognises the condition however it surfaces (an `OSError` with ENOSPC, EFBIG or
EDQUOT, or a library's exception that wraps one in its text, as safetensors does);
`write_file` and `append_text` write a single file whole or not at all. Folders are written by
`durable.write_folder`, which uses the same error.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from .disk import format_bytes
from .errors import PetkitError

FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")


class DiskFullError(PetkitError):
    """A save ran out of disk space (or hit a file-size limit); nothing was replaced."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) says the disk or a file-size limit is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def full_message(final: Path, need: int | None, wrote: int) -> str:
    """The one line a user sees: where, how much was needed (else written), how much is free."""
    free = shutil.disk_usage(final.parent).free
    need_text = f"about {format_bytes(need)}" if need else f"more than the {format_bytes(wrote)} written"
    return (f"not enough space in {final.parent} to save {final.name}: it needs {need_text}, "
            f"{format_bytes(free)} is free (or a file-size limit was hit); nothing was replaced "
            f"and the partial files are removed: free some space and run it again")


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically create or replace file `path` with `data` (temp file, fsync, rename); on a
    full disk the temp file is removed and the old file kept (`DiskFullError`)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.petkit-tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFullError(full_message(path, len(data), 0)) from None
        raise
    return path


def write_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                  ) -> Path:
    """`write_file` of a safetensors file: atomic, full-disk safe, and with the mode the umask
    gives a new file (safetensors' own `save_file` creates it 0600)."""
    from safetensors.torch import save

    return write_file(path, save({k: v.detach().contiguous() for k, v in tensors.items()},
                                 metadata=metadata))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` whole or not at all: a full disk truncates back what was written
    of it (`DiskFullError`), so a log never ends in half a row."""
    data = memoryview(text.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError as exc:
        os.ftruncate(fd, size)
        if is_disk_full(exc):
            raise DiskFullError(full_message(Path(path), len(text.encode()), 0)) from None
        raise
    finally:
        os.close(fd)
