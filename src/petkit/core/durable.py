"""Crash-safe folders: atomic replacement of a folder, and locks (savers, run folders).

`write_folder(final, fill)` builds the new folder in a temp folder beside `final` and fsyncs
it. Versioned (adapters: `versioned=True`), the new copy is `.<name>.v<N>` and `final` a
symlink swapped onto it with one `os.replace`: `final` is never missing and never mixed, and
`read_version` reads the one version it resolved (again on the next if a save removed it
mid-read). Otherwise the old `final` is renamed aside and the new one in (a reader in between
finds the aside copy through `resolve_folder`). Savers into one parent serialise on an `flock`
of the parent; temp, aside and unlinked version folders left by a killed saver are removed by
the next save, and by the next read when no saver is busy. A full disk (or a file-size limit)
during a save is a `DiskFullError` naming the folder and the space needed, after the partial
files are removed; the previous version is untouched. `RunLock` keeps one live run per run
folder (pid + host in the lock file; a lock whose process died is taken over with a warning). Every file and folder a save writes gets the mode
the user's umask gives a new one (0644 / 0755 under umask 022): writers that create private
files (safetensors writes 0600) do not leave a model another user or a serving container cannot
read.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .disk import folder_bytes
from .disk_full import DiskFullError, full_message, is_disk_full
from .errors import PetkitError

TMP, OLD, VERSION = ".petkit-tmp-", ".petkit-old-", ".v"
T = TypeVar("T")
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


def _siblings(final: Path, marker: str) -> list[Path]:
    prefix = f".{final.name}{marker}"
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def resolve_folder(final: Path, complete: Callable[[Path], bool] = lambda p: True) -> Path:
    """The folder a reader of `final` should read, resolved once: the version a versioned
    `final` links to; a plain `final`; or, when an older release's save was cut between its two
    renames, the newest complete aside copy."""
    if final.is_symlink():
        return Path(os.path.realpath(final))
    if final.is_dir():
        return final
    asides = [p for p in _siblings(final, OLD) if complete(p)]
    return asides[-1] if asides else final


def read_version(final: Path, read: Callable[[Path], T],
                 complete: Callable[[Path], bool] = lambda p: True) -> T:
    """`read(folder)` of the version of `final` current now (`resolve_folder`). A version is
    never changed once published, and the reader pins it (a shared `flock` that `clean_stale`
    respects) for the read, so a concurrent save cannot remove it mid-read; in the instant
    between resolving and pinning it may, and the read then starts on the new version."""
    clean_if_idle(final)
    for attempt in range(64):
        folder = resolve_folder(final, complete)
        with _pinned(folder) as here:
            if here:
                return read(folder)
        if resolve_folder(final, complete) == folder:
            break
    return read(resolve_folder(final, complete))  # raises the reader's own error


@contextlib.contextmanager
def _pinned(folder: Path) -> Iterator[bool]:
    """A shared `flock` on `folder` while the block runs; yields False when `folder` is gone
    (removed between resolving and pinning). A folder that cannot be opened is read unpinned."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield folder.is_dir()
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield os.fstat(fd).st_nlink > 0  # an unlinked folder counts no links
    finally:
        os.close(fd)


def _remove_unpinned(path: Path) -> None:
    """Remove version folder `path` unless a reader pins it (it goes with a later save or read).
    The exclusive lock is held while removing, so a reader pinning meanwhile sees it gone."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        _remove(path)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove(path)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _versions(final: Path) -> dict[int, Path]:
    pattern = re.compile(re.escape(f".{final.name}{VERSION}") + r"(\d+)")
    if not final.parent.is_dir():
        return {}
    return {int(m.group(1)): p for p in final.parent.iterdir() if (m := pattern.fullmatch(p.name))}


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(final: Path) -> None:
    """Undo what a killed saver of `final` left: put an aside copy back if `final` is missing,
    delete temp and other aside folders and every version `final` does not link to. Call it
    holding the parent's saver lock."""
    asides = _siblings(final, OLD)
    if asides and not final.exists() and not final.is_symlink():
        os.replace(asides.pop(), final)
    current = resolve_folder(final).resolve() if final.is_symlink() else None
    # compared resolved: `final` may be relative, the link's target is resolved
    unused = [p for p in _versions(final).values() if p.resolve() != current]
    temps = [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}{TMP}")] \
        if final.parent.is_dir() else []
    for stale in asides + temps:
        _remove(stale)
    for stale in unused:
        _remove_unpinned(stale)


def clean_if_idle(final: Path) -> None:
    """`clean_stale(final)` when no saver holds the parent now (a reader's chance to clean what
    a killed save left); nothing when the folder is busy, read-only or lock-less."""
    try:
        with folder_lock(final.parent, timeout=0.0):
            clean_stale(final)
    except (OSError, PetkitError):
        pass


def clean_folder(parent: Path) -> None:
    """`clean_stale` for every folder of `parent` a killed saver left temp or aside copies of."""
    if not parent.is_dir():
        return
    with folder_lock(parent):
        names = {p.name[1:].split(marker, 1)[0] for p in parent.iterdir()
                 for marker in (TMP, OLD, VERSION) if p.name.startswith(".") and marker in p.name}
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


def _fill_version(final: Path, tmp: Path, fill: Callable[[Path], Any], need: int | None) -> None:
    """`fill(tmp)` and fsync it; on any failure `tmp` is removed, a full disk told clearly."""
    try:
        if need is not None and shutil.disk_usage(final.parent).free < need:
            raise OSError(errno.ENOSPC, "not enough free space before writing")
        fill(tmp)
        follow_umask(tmp)
        fsync_tree(tmp)
    except BaseException as exc:
        wrote = folder_bytes(tmp) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(full_message(final, need, wrote)) from None
        raise


def write_folder(final: str | os.PathLike, fill: Callable[[Path], Any], *, versioned: bool = False,
                 need_bytes: int | None = None) -> Path:
    """Atomically create or replace folder `final` with what `fill(tmp_folder)` writes.

    `versioned`: `final` becomes a symlink to `.<name>.v<N>`, swapped with one `os.replace`, so a
    reader never finds it missing (see `read_version`). `need_bytes`: the expected size, checked
    against the free space before writing. A full disk is a `DiskFullError` naming the folder and
    the space needed; the previous version stays as it was.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(parent):
        clean_stale(final)
        if versioned and _can_link(final):
            return _swap_version(final, fill, need_bytes)
        tmp = parent / f".{final.name}{TMP}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        _fill_version(final, tmp, fill, need_bytes)
        aside = parent / f".{final.name}{OLD}{uuid.uuid4().hex[:12]}"
        if final.exists() or final.is_symlink():
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_path(parent, directory=True)
        _remove(aside)
        for version in _versions(final).values():  # a versioned save's copies, now replaced
            _remove(version)
    return final


def _can_link(final: Path) -> bool:
    # named as a temp of `final`, so a save killed right here leaves nothing the next one keeps
    probe = final.parent / f".{final.name}{TMP}probe-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(".", probe)
    except (OSError, NotImplementedError):
        return False
    probe.unlink()
    return True


def _swap_version(final: Path, fill: Callable[[Path], Any], need: int | None) -> Path:
    parent, versions = final.parent, _versions(final)
    version = parent / f".{final.name}{VERSION}{max(versions, default=0) + 1}"
    version.mkdir()
    _fill_version(final, version, fill, need)
    link = parent / f".{final.name}{TMP}link-{uuid.uuid4().hex[:12]}"
    try:
        os.symlink(version.name, link)
        if final.is_dir() and not final.is_symlink():  # a plain folder from an older release
            _exchange(link, final)
            _remove(link)
        else:
            os.replace(link, final)
    except BaseException as exc:
        _remove(link)
        _remove(version)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFullError(full_message(final, need, 0)) from None
        raise
    _fsync_path(parent, directory=True)
    for old in versions.values():
        _remove_unpinned(old)
    return final


def _exchange(link: Path, folder: Path) -> None:
    """Swap the names `link` and `folder` (Linux `renameat2(RENAME_EXCHANGE)`, atomic); else
    rename the folder aside first (a reader finds the aside copy in between)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(link), at_fdcwd, os.fsencode(folder),
                          rename_exchange) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.replace(folder, folder.parent / f".{folder.name}{OLD}{uuid.uuid4().hex[:12]}")
    os.replace(link, folder)
    clean_stale(folder)
