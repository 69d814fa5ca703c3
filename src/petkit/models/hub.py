"""Hugging Face hub ids: downloaded when the hub is reachable, else read from the local cache,
else one clear error (instead of a minute of retries and a transformers traceback).

Embedded names and local folders never touch the network; only a hub id does, so petkit leaves
the hub's online mode alone. `HF_HUB_OFFLINE=1` still works: then the cache alone is used.
"""

from __future__ import annotations

import functools
import os

from petkit.core.errors import PetkitError

PROBE_SECONDS = 5.0


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when the hub's endpoint answers within a few seconds (asked once per process)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception:  # any network failure means "not reachable"
        return False
    return True


def _cached(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or not a valid id
        return None


def hub_model(name: str, local_choices: str) -> str:
    """What transformers should load for `name` (not an embedded name, not an existing path):
    the id itself when the hub is reachable or offline mode is on, else its cached snapshot.
    `local_choices` lists the embedded names, for the error."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PetkitError(f"model folder not found: {name} (embedded names: {local_choices})")
    if _offline() or hub_reachable():
        return name
    cached = _cached(name)
    if cached is not None:
        return cached
    from huggingface_hub import constants

    raise PetkitError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to download "
                      f"model {name!r}, and it is not in the local cache: connect to the network, "
                      f"or give a local folder or an embedded name ({local_choices})")
