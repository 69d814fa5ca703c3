"""Errors a petkit user can get for a mistake of theirs. All derive from `PetkitError`."""

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the choices close to `name`, else ""."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


class PetkitError(Exception):
    """Base class of every error petkit raises on purpose."""


class ConfigError(PetkitError, ValueError):
    """A configuration value is out of range or inconsistent (names the field and allowed range)."""


class TargetError(PetkitError, LookupError):
    """A target pattern matched nothing, or a method cannot apply to the given modules."""


class AdapterLoadError(PetkitError):
    """An adapter folder cannot be loaded into this model (wrong base, shapes, keys, corrupt file)."""


class CheckpointError(PetkitError):
    """A training checkpoint is missing, incomplete or does not fit the run."""


class AdapterStateError(PetkitError):
    """An operation does not fit the adapter's state (unknown name, already attached, merged...)."""


class MissingPackageError(PetkitError, ImportError):
    """An optional or embedded package is not installed; the message says which pip install fixes it."""
