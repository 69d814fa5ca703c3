"""The OpenAI wire format of `petkit serve`: request bodies (validated by pydantic), the error
object, and the response and stream-chunk shapes. No engine, no HTTP here.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI's API


class ApiError(Exception):
    """An error the client gets as OpenAI-style JSON with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {message, type, param, code}}."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Body(BaseModel):
    """Fields every generation request shares; unknown fields are ignored, as OpenAI clients add
    fields over time."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    logprobs: bool | int | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> None:
        if value:
            raise ValueError("logprobs are not served by petkit serve")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stops

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: a last chunk carries the token counts."""
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message; content as a string or as a list of text parts."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_TextPart]

    def as_dict(self) -> dict[str, str]:
        """{"role", "content"} with text parts joined, as chat templates expect."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatBody(_Body):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def new_tokens(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Body):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not served by petkit serve (the prompt is yours already)")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (send several requests; they are batched)")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    @property
    def new_tokens(self) -> int | None:
        """max_tokens."""
        return self.max_tokens


class LoadAdapterBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's names)."""

    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/@+-]+$")
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's names)."""

    lora_name: str = Field(min_length=1)


class Reply:
    """Ids, timestamps and the shapes of one request's responses and stream chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text or ""}, "logprobs": None,
                "finish_reason": finish}

    def whole(self, text: str, finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
        """The non-streamed response."""
        return {**self._envelope(False, [self._choice(text, finish, delta=False)]), "usage": usage}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role; completions have no such chunk."""
        if not self.chat:
            return None
        return self._envelope(True, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])

    def chunk(self, text: str) -> dict[str, Any]:
        """A chunk carrying one piece of text."""
        return self._envelope(True, [self._choice(text, None, delta=True)])

    def last_chunk(self, finish: str | None) -> dict[str, Any]:
        """The chunk that says why generation stopped."""
        return self._envelope(True, [self._choice(None, finish, delta=True)])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """stream_options.include_usage: no choices, the token counts."""
        return {**self._envelope(True, []), "usage": usage}
