"""Crash-safe folders: atomic replacement of a folder, and locks (savers, run folders).

`write_folder(final, fill)` builds the new folder in a temp folder beside `final`, fsyncs its
files and itself, renames the old `final` aside, renames the new one in, fsyncs the parent and
only then deletes the old copy. Every file and folder in it gets the mode the user's umask gives
a new one (0644 / 0755 under umask 022): writers that create private files (safetensors writes
0600) do not leave a model another user or a serving container cannot read. A reader therefore always finds a complete folder: `final`, or
(in the instant between the two renames, or after a crash there) the aside copy, which
`resolve_folder` returns and the next save renames back. Savers into one parent serialise on an
`flock` of the parent folder; temp and aside folders left by a killed saver are removed by the
next save. `RunLock` keeps one live run per run folder (pid + host in the lock file; a lock whose
process died is taken over with a warning).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PetkitError

TMP, OLD = ".petkit-tmp-", ".petkit-old-"
LOCK_TIMEOUT_S = 60.0


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. a platform that cannot open folders: nothing more to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves (deepest first)."""
    dirs = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            _fsync_path(path)
    for d in reversed(dirs):
        _fsync_path(d, directory=True)


@contextlib.contextmanager
def folder_lock(folder: Path, *, shared: bool = False, timeout: float | None = None) -> Iterator[None]:
    """`flock` on `folder` itself (no lock file is left behind); waits up to `timeout` seconds
    (default `LOCK_TIMEOUT_S`)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: saves are not serialised
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PetkitError(f"another process has been saving into {folder} for over "
                                      f"{timeout:.0f} s; try again when it is done") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def reading(final: Path) -> Iterator[None]:
    """Hold a shared lock on `final`'s parent while reading it, so no save swaps it mid-read.

    Where the lock cannot be had (a read-only or lock-less file system, a saver stuck for
    `LOCK_TIMEOUT_S`), the read goes on without it: `resolve_folder` still finds a complete copy.
    """
    try:
        lock = folder_lock(final.parent, shared=True)
        lock.__enter__()
    except (OSError, PetkitError):
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _siblings(final: Path, marker: str) -> list[Path]:
    prefix = f".{final.name}{marker}"
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def resolve_folder(final: Path, complete: Callable[[Path], bool] = lambda p: True) -> Path:
    """`final`, or when a save was cut between its two renames, the newest complete aside copy."""
    if final.is_dir():
        return final
    asides = [p for p in _siblings(final, OLD) if complete(p)]
    return asides[-1] if asides else final


def clean_stale(final: Path) -> None:
    """Undo what a killed saver of `final` left: put an aside copy back if `final` is missing,
    delete temp and other aside folders. Call it holding the parent's saver lock."""
    asides = _siblings(final, OLD)
    if asides and not final.exists():
        os.replace(asides.pop(), final)
    for stale in asides + _siblings(final, TMP):
        shutil.rmtree(stale, ignore_errors=True)


def clean_folder(parent: Path) -> None:
    """`clean_stale` for every folder of `parent` a killed saver left temp or aside copies of."""
    if not parent.is_dir():
        return
    with folder_lock(parent):
        names = {p.name[1:].split(marker, 1)[0] for p in parent.iterdir()
                 for marker in (TMP, OLD) if p.name.startswith(".") and marker in p.name}
        for name in names:
            clean_stale(parent / name)


def current_umask() -> int:
    """This process's umask (Linux: read from /proc, no change; elsewhere: set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything under it the modes the umask gives new files (0666 & ~umask)
    and folders (0777 & ~umask)."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_folder(final: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Atomically create or replace folder `final` with what `fill(tmp_folder)` writes."""
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(parent):
        clean_stale(final)
        tmp = parent / f".{final.name}{TMP}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            fill(tmp)
            follow_umask(tmp)
            fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        aside = parent / f".{final.name}{OLD}{uuid.uuid4().hex[:12]}"
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_path(parent, directory=True)
        shutil.rmtree(aside, ignore_errors=True)
    return final


# --- one live run per run folder -----------------------------------------------------------


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
