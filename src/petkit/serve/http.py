"""OpenAI-compatible HTTP layer of `petkit serve`: parse, validate, map errors, stream. Batching,
adapters and sampling are the engine's (serve/engine.py); this file only speaks HTTP.

    app = create_app(engine, ServeSettings(model_name="smollm2-135m"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, /v1/completions (streamed as server-sent events with
"stream": true, ending in `data: [DONE]`), GET /v1/models, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's names), GET /health, /metrics (Prometheus text) and the playground
page at /. The request's "model" names the base or an adapter. Every error is OpenAI's JSON object
with a status: 400 bad JSON or fields, 401 wrong key, 404 unknown model, 413 body too large,
503 queue full; an unexpected failure is a 500 with no traceback (it goes to the server log).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from petkit.core.errors import AdapterLoadError, PetkitError
from petkit.serve.engine import Engine, GenerationRequest, Handle, QueueFull, UnknownAdapter
from petkit.serve.limits import BodyLimit, allowed_adapter_path, raise_thread_limit
from petkit.serve.metrics import ServeMetrics
from petkit.serve.openai_api import (ApiError, ChatBody, CompletionBody, LoadAdapterBody, Reply,
                                     UnloadAdapterBody, error_body)

LOG = logging.getLogger("petkit.serve")
STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces; `petkit serve`'s flags fill it."""

    model_name: str  # the base's name in "model" and /v1/models
    api_key: str | None = None  # Bearer key for /v1/*; None: open
    max_tokens: int = 1024  # a request asking for more new tokens gets 400
    default_tokens: int = 256  # new tokens when a request names none
    max_body_bytes: int = 1 << 20  # larger bodies get 413 before any parsing
    adapter_root: Path | None = None  # runtime loads only from folders under it (None: anywhere)


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's first complaint, in words, naming the field as OpenAI's `param`."""
    first = (exc.errors() or [{}])[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


class _Server:
    """The routes' shared state: the engine, the settings, the metrics."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine, self.settings = engine, settings
        self.metrics = ServeMetrics(lambda: float(engine.queue_depth()))

    # -- requests ---------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        """401 unless the Authorization header carries the server's Bearer key."""
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def adapter_for(self, model: str) -> str | None:
        """None for the base's name, the adapter's name for a known adapter, else 404."""
        if model == self.settings.model_name:
            return None
        if model in self.engine.adapters():
            return model
        known = ", ".join([self.settings.model_name, *self.engine.adapters()])
        raise ApiError(404, f"the model {model!r} does not exist; served here: {known}",
                       param="model", code="model_not_found")

    def new_tokens(self, asked: int | None) -> int:
        """The request's max new tokens, or the default; 400 over the server's limit."""
        limit = self.settings.max_tokens
        if asked is not None and asked > limit:
            raise ApiError(400, f"max_tokens {asked} is over this server's limit of {limit} "
                                f"(petkit serve --max-tokens)", param="max_tokens")
        return min(asked or self.settings.default_tokens, limit)

    def submit(self, body: ChatBody | CompletionBody) -> Handle:
        """The engine's handle for the request; engine refusals mapped to statuses."""
        prompt: dict[str, Any]
        if isinstance(body, ChatBody):
            prompt = {"messages": [m.as_dict() for m in body.messages]}
        elif isinstance(body.prompt, str):
            prompt = {"prompt": body.prompt}
        else:
            prompt = {"prompt_ids": list(body.prompt)}
        try:
            request = GenerationRequest(**prompt, adapter=self.adapter_for(body.model),
                                        max_new_tokens=self.new_tokens(body.new_tokens),
                                        temperature=body.temperature, top_p=body.top_p,
                                        seed=body.seed, stop=list(body.stop))
            return self.engine.submit(request)
        except QueueFull as err:
            raise ApiError(503, f"the server is busy: {err}; retry later",
                           type_="server_overloaded", code="queue_full") from err
        except UnknownAdapter as err:
            raise ApiError(404, str(err), param="model", code="model_not_found") from err
        except PetkitError as err:  # the engine's word on the prompt (too long for the model...)
            raise ApiError(400, str(err).splitlines()[0]) from err

    # -- answers ----------------------------------------------------------------------------------
    async def generate(self, body: ChatBody | CompletionBody, endpoint: str) -> Response:
        """Submit the request; answer whole or as a stream of server-sent events."""
        started = time.perf_counter()
        handle = await run_in_threadpool(self.submit, body)
        reply = Reply(isinstance(body, ChatBody), body.model)
        if body.stream:
            events = self._events(handle, reply, body.include_usage, endpoint, started)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.metrics.in_flight.inc()
        try:
            text = "".join([piece async for piece in self._pieces(handle, endpoint, started)])
        finally:
            self.metrics.in_flight.dec()
        if handle.finish_reason == "error":
            raise ApiError(500, f"generation failed: {handle.error}", type_="server_error")
        usage = dict(handle.usage)
        self.metrics.finished(endpoint, usage, time.perf_counter() - started)
        self.metrics.answered(endpoint, 200)
        return _json(200, reply.whole(text, handle.finish_reason, usage))

    async def _pieces(self, handle: Handle, endpoint: str, started: float) -> AsyncIterator[str]:
        """The handle's text pieces, read off the event loop; a client gone mid-stream (this
        generator closed or cancelled) cancels the request, which frees its batch row."""
        first = True
        try:
            async for piece in iterate_in_threadpool(iter(handle)):
                if first:
                    self.metrics.first_token.labels(endpoint=endpoint).observe(time.perf_counter() - started)
                    first = False
                yield piece
        finally:
            handle.cancel()  # no-op once finished

    async def _events(self, handle: Handle, reply: Reply, usage: bool, endpoint: str,
                      started: float) -> AsyncIterator[str]:
        self.metrics.in_flight.inc()
        try:
            opening = reply.first_chunk()
            if opening is not None:
                yield _sse(opening)
            async for piece in self._pieces(handle, endpoint, started):
                yield _sse(reply.chunk(piece))
            if handle.finish_reason == "error":
                raise RuntimeError(handle.error)
            yield _sse(reply.last_chunk(handle.finish_reason))
            if usage:
                yield _sse(reply.usage_chunk(dict(handle.usage)))
            self.metrics.finished(endpoint, dict(handle.usage), time.perf_counter() - started)
            self.metrics.answered(endpoint, 200)
        except Exception as err:  # headers are gone: the error travels as an event
            LOG.exception("generation failed mid-stream")
            self.metrics.answered(endpoint, 500)
            yield _sse(error_body(f"generation failed: {err}", "server_error"))
        finally:
            self.metrics.in_flight.dec()
        yield "data: [DONE]\n\n"

    # -- adapters ---------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """/v1/models: the base, then every adapter with the base as its parent (as vLLM)."""
        base = self.settings.model_name
        cards = [{"id": base, "object": "model", "created": 0, "owned_by": "petkit",
                  "root": base, "parent": None}]
        cards += [{"id": name, "object": "model", "created": 0, "owned_by": "petkit",
                   "root": name, "parent": base} for name in self.engine.adapters()]
        return {"object": "list", "data": cards}

    def load(self, body: LoadAdapterBody) -> str:
        """Register an adapter folder under a new name; a refused folder changes nothing."""
        if body.lora_name == self.settings.model_name or body.lora_name in self.engine.adapters():
            raise ApiError(400, f"the adapter {body.lora_name!r} is already loaded (unload it first)",
                           param="lora_name", code="adapter_exists")
        path = allowed_adapter_path(body.lora_path, self.settings.adapter_root)
        try:
            self.engine.add_adapter(body.lora_name, path)
        except AdapterLoadError as err:
            raise ApiError(400, f"adapter {body.lora_name!r} refused: {str(err).splitlines()[0]}",
                           param="lora_path", code="invalid_adapter") from err
        except Exception as err:  # anything else a hostile folder provokes is refused the same way
            LOG.exception("adapter %r failed to load", body.lora_name)
            raise ApiError(400, f"adapter {body.lora_name!r} refused: {type(err).__name__}",
                           param="lora_path", code="invalid_adapter") from err
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    def unload(self, body: UnloadAdapterBody) -> str:
        """Forget an adapter; 404 for a name that is not loaded."""
        if body.lora_name not in self.engine.adapters():
            raise ApiError(404, f"the adapter {body.lora_name!r} is not loaded",
                           param="lora_name", code="model_not_found")
        self.engine.remove_adapter(body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The ASGI app over a started engine (the caller starts and stops the engine)."""
    server = _Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise_thread_limit(engine.max_queue + engine.max_batch + 16)  # one thread per waiting reader
        yield

    app = FastAPI(title="petkit serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    _errors(app, server)
    _routes(app, server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       too_large=lambda: error_body(f"the request body is over the server's limit of "
                                                    f"{settings.max_body_bytes} bytes",
                                                    "invalid_request_error", code="body_too_large"))
    return app


def _errors(app: FastAPI, server: _Server) -> None:
    """Every failure as OpenAI's JSON error object."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        server.metrics.answered(request.url.path, exc.status)
        return _json(exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json(exc.status_code, error_body(f"{request.method} {request.url.path}: {exc.detail}", kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        LOG.exception("request to %s failed", request.url.path)
        return _json(500, error_body(f"internal error ({type(exc).__name__}); see the server log",
                                     "server_error"))


def _routes(app: FastAPI, server: _Server) -> None:
    keyed = [Depends(server.check_key)]

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(body: ChatBody) -> Response:
        return await server.generate(body, "/v1/chat/completions")

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionBody) -> Response:
        return await server.generate(body, "/v1/completions")

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/load_lora_adapter", dependencies=keyed)
    async def load(body: LoadAdapterBody) -> PlainTextResponse:
        return PlainTextResponse(await run_in_threadpool(server.load, body))

    @app.post("/v1/unload_lora_adapter", dependencies=keyed)
    async def unload(body: UnloadAdapterBody) -> PlainTextResponse:
        return PlainTextResponse(await run_in_threadpool(server.unload, body))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.engine.is_running()
        return _json(200 if alive else 503, {"status": "ok" if alive else "engine stopped"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")
