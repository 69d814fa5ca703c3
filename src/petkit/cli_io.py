"""The command line's two consoles and its usage error, shared by the parser (`petkit.cli`) and
the commands (`petkit.cli_commands`)."""

from __future__ import annotations

from rich.console import Console

from petkit.core.errors import PetkitError

ERR = Console(stderr=True, highlight=False, soft_wrap=True)
OUT = Console(highlight=False, soft_wrap=True)


class UsageError(PetkitError):
    """A command-line mistake (unknown flag, missing value)."""
