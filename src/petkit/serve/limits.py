"""The guards `petkit serve` puts around the engine: a request-body size limit enforced before any
parsing, the loopback-only bind, the folder runtime adapter loads must come from, and enough
worker threads for every waiting stream reader."""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petkit.core.errors import ConfigError
from petkit.serve.openai_api import ApiError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before the app sees any of it — at once
    when its Content-Length says so, else as soon as the bytes read pass the limit (chunked
    uploads). A body within the limit is read whole and handed on."""

    def __init__(self, app: Any, limit: int, too_large: Callable[[], dict[str, Any]]) -> None:
        self.app, self.limit, self.too_large = app, limit, too_large

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        body, handed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal handed
            if handed:  # after the body: disconnect notices, as the server sends them
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Callable) -> None:
        body = json.dumps(self.too_large()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback --host unless --allow-remote says the user means it."""
    if not allow_remote and not is_loopback(host):
        raise ConfigError(f"--host {host} would accept connections from other machines; "
                          f"pass --allow-remote as well if you mean it (and set --api-key), "
                          f"or use --host 127.0.0.1")


def allowed_adapter_path(path: str, root: Path | None) -> Path:
    """The folder a runtime load may read: an existing folder, under `root` when one is set
    (symlinks resolved first, so a link cannot lead outside); else 400."""
    folder = Path(path).expanduser().resolve()
    if root is not None and not folder.is_relative_to(root.resolve()):
        raise ApiError(400, f"lora_path {path!r} is outside the folder adapters may be loaded from "
                            f"(petkit serve --adapter-root)", param="lora_path", code="invalid_adapter")
    if not folder.is_dir():
        raise ApiError(400, f"lora_path {path!r} is not a folder on the server",
                       param="lora_path", code="invalid_adapter")
    return folder


def raise_thread_limit(threads: int) -> None:
    """Let at least `threads` blocking reads run at once on the event loop's worker threads."""
    import anyio.to_thread

    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, threads)
