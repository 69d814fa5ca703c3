"""Tensors that live in files (`--runtime.offload_optimizer=nvme`; docs/offload.md).

`FileStore.copy(tensor)` returns a copy of `tensor` whose storage is a file in the store's folder,
memory-mapped shared (`torch.from_file`): writes go to the file, and the operating system's page
cache keeps in host memory only what fits and was used lately, so optimiser state larger than
host memory can live on an NVMe drive. Each file's blocks are reserved when it is made
(`posix_fallocate`: a full drive is a clear error then, not a bus error at the first write into a
hole), and the file is unlinked at once: the mapping keeps it alive, and nothing is left on the
drive when the process ends, however it ends.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from petkit.core.errors import ConfigError

_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


class FileStore:
    """Memory-mapped tensors in `folder` (None: the system's temporary folder, `TMPDIR`)."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = Path(folder) if folder else Path(tempfile.gettempdir())
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--runtime.offload_dir {self.folder}: cannot create it "
                              f"({exc.strerror})") from exc
        self.names = itertools.count()
        self.bytes = 0  # held in files so far

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A file-backed copy of `tensor` (same shape and dtype, contiguous)."""
        nbytes = tensor.numel() * tensor.element_size()
        path = self.folder / f"petkit-offload-{os.getpid()}-{next(self.names)}.bin"
        self._reserve(path, nbytes)
        try:
            out = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            path.unlink()
        self.bytes += nbytes
        return out.view(tensor.shape).copy_(tensor)

    def _reserve(self, path: Path, nbytes: int) -> None:
        """Make `path` with `nbytes` of blocks reserved; ConfigError when the drive lacks them."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(f"--runtime.offload_dir {self.folder}: cannot write a file there "
                              f"({exc.strerror})") from exc
        try:
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                free = shutil.disk_usage(self.folder).free  # no reservation on this file system
                if free < nbytes:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
                os.ftruncate(fd, max(nbytes, 1))
        except OSError as exc:
            path.unlink()
            raise ConfigError(f"--runtime.offload_dir {self.folder}: cannot hold "
                              f"{nbytes / 2**20:.1f} MiB more of optimiser state after "
                              f"{self.bytes / 2**30:.2f} GiB ({exc.strerror}); free space there "
                              f"or point --runtime.offload_dir at a larger drive") from exc
        finally:
            os.close(fd)


def file_backed(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s storage is a memory-mapped file."""
    return tensor.untyped_storage().filename is not None
