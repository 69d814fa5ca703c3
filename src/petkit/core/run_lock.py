"""One live run per run folder: `RunLock` (pid + host in the lock file; a lock whose process
died is taken over with a warning)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock of a run folder, held by this process while the run goes on.

    The lock file (`.petkit-run.lock`) records pid, host and start time. A second run into the
    folder gets a `CheckpointError` naming the holder. A lock left by a process that died is
    free (the `flock` went with the process); it is taken over with a warning naming it.
    """

    NAME = ".petkit-run.lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text()[:4096])
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock or raise `CheckpointError`; warn when taking over a stale one."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: fall back to the pid record only
            fcntl = None  # type: ignore[assignment]
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # the file may be replaced under us by a releasing holder
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                elif self._held_by_live_process():
                    raise BlockingIOError
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(self._busy_message()) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:  # pragma: no cover - only under a storm of concurrent runs
            raise CheckpointError(f"{self.folder}: could not take the run lock {self.path}")
        self.fd = fd
        self._warn_if_stale()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        return self

    def _held_by_live_process(self) -> bool:
        holder = self._holder()
        return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                and holder["pid"] != os.getpid() and _alive(holder["pid"]))

    def _busy_message(self) -> str:
        h = self._holder()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if isinstance(
            h.get("since"), (int, float)) else "?"
        return (f"{self.folder} is in use by another run (pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')}, since {since}); wait for it to finish or choose another "
                "output_dir")

    def _warn_if_stale(self) -> None:
        h = self._holder()
        if not h or h.get("pid") == os.getpid():
            return
        here = h.get("host") == socket.gethostname()
        state = "is no longer running" if here else f"ran on host {h.get('host')!r}; its lock is free"
        warnings.warn(f"{self.folder}: taking over a stale run lock of pid {h.get('pid')} "
                      f"(that process {state})", stacklevel=4)

    def release(self) -> None:
        """Drop the lock and remove the lock file."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
