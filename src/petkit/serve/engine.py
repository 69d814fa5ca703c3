"""The serving engine: many requests over many adapters, continuously batched on one base model.

    engine = Engine(model, tokenizer, max_batch=16, max_adapters=8, max_queue=64)
    engine.add_adapter("support", "runs/support/adapter")   # checked; refused -> AdapterLoadError
    handle = engine.submit(GenerationRequest(messages=[{"role": "user", "content": "Hi"}],
                                             adapter="support", max_new_tokens=32))
    engine.start()                      # or call engine.step() yourself (tests do)
    for piece in handle: print(piece, end="")
    handle.finish_reason, handle.usage

Each `step()` admits waiting requests while rows are free (each prefilled alone, then joining the
batch: serve.kv_batch), and runs ONE decode forward for every running row, whatever its adapter:
the adapters' low-rank terms are gathered per row by the pool's LowRankBank (core.batched_lowrank),
the base matmuls shared. Finished and cancelled rows leave at once. Every row sees only its own
tokens and its own adapter, so it gets what the same request served alone gets (greedy: token for
token). On a GPU a one-row prefill of up to 2,048 tokens replays a captured CUDA graph, the base's or
its adapter slot's (serve.prefill_graphs; `cuda_graphs=False` / `--no-cuda-graphs` turns it off).
`petkit chat` / `generate` and `petkit serve` both run on this engine.
"""
from __future__ import annotations

import collections
import difflib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.core.state import adapters as attached
from petkit.serve.adapter_pool import AdapterPool
from petkit.serve.kv_batch import BatchCache, cache_kwarg, output_cache
from petkit.serve.prefill_graphs import PrefillGraphs
from petkit.serve.request import GenerationRequest, Handle, QueueFull, UnknownAdapter
from petkit.serve.sampling import choose, row_generator
from petkit.serve.text import TextStream

__all__ = ["Engine", "GenerationRequest", "Handle", "QueueFull", "UnknownAdapter"]
LOG = logging.getLogger("petkit.serve")


@dataclass
class _Row:
    handle: Handle
    slot: int
    stream: TextStream
    generator: torch.Generator
    last: int = 0


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, max_batch: int = 16, max_adapters: int = 8,
                 max_queue: int = 64, cuda_graphs: bool = True) -> None:
        for field_, value in (("--max-batch", max_batch), ("--max-adapters", max_adapters), ("--max-queue", max_queue)):
            if value < 1:
                raise ConfigError(f"{field_} must be >= 1, got {value}")
        if attached(model):
            raise ConfigError(f"the engine takes the base model; it has adapters attached {sorted(attached(model))}: "
                              "add them with engine.add_adapter(name, path) instead")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_adapters, self.max_queue = max_batch, max_adapters, max_queue
        self.device = next(model.parameters()).device
        self.pool = AdapterPool(model, max_adapters)
        self.graphs = PrefillGraphs(model, self.pool.bank) if cuda_graphs and self.device.type == "cuda" else None
        self.eos = _eos_ids(model, tokenizer)
        self.cache_kw = cache_kwarg(model)
        self.max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._rows: list[_Row] = []
        self._batch = BatchCache()
        self._queue: collections.deque[Handle] = collections.deque()
        self._lock = threading.RLock()  # the model and the running batch
        self._wake = threading.Condition()  # the queue
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # ---- adapters ----
    def add_adapter(self, name: str, path: str | os.PathLike) -> str:
        """Check and load an adapter folder onto the host as `name`; returns its method.
        A refused folder raises AdapterLoadError and changes nothing."""
        if not name or name == "base":
            raise ConfigError(f"adapter name {name!r} is reserved")
        if name in self.pool.host:
            raise ConfigError(f"an adapter named {name!r} is already loaded; remove it first")
        with self._lock:
            return self.pool.load(name, path)

    def remove_adapter(self, name: str) -> None:
        """Forget adapter `name`: rows running on it finish, queued requests for it are cancelled."""
        with self._lock:
            if name not in self.pool.host:
                raise UnknownAdapter(self._unknown(name))
            self.pool.remove(name)
        with self._wake:
            for handle in [h for h in self._queue if h.request.adapter == name]:
                self._queue.remove(handle)
                handle.finish("cancelled", f"adapter {name!r} was removed")

    def adapters(self) -> list[str]:
        return self.pool.names()

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.pool.names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown adapter {name!r} (loaded: {', '.join(self.pool.names()) or 'none'}){hint}"

    # ---- requests ----
    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request; raises QueueFull, UnknownAdapter, or ConfigError for a bad prompt."""
        if request.adapter is not None and request.adapter not in self.pool.host:
            raise UnknownAdapter(self._unknown(request.adapter))
        ids = self._prompt_ids(request)
        handle = Handle(request, ids)
        with self._wake:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue})")
            self._queue.append(handle)
            self._wake.notify()
        return handle

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            ids = [int(i) for i in request.prompt_ids]
        elif self.tokenizer is None:
            raise ConfigError("this engine has no tokenizer: send prompt_ids")
        elif request.messages is not None:
            ids = chat_ids(self.tokenizer, request.messages)
        else:
            ids = list(self.tokenizer(request.prompt).input_ids)
        if not ids:
            raise ConfigError("the prompt is empty")
        if self.max_length is not None and len(ids) + request.max_new_tokens > self.max_length:
            raise ConfigError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
                              f"is over the model's {self.max_length} positions")
        return ids

    def queue_depth(self) -> int:
        return len(self._queue)

    def active_rows(self) -> int:
        return len(self._rows)

    def stats(self) -> dict[str, float]:
        """Counters: steps run, adapters registered and resident, swaps and their total seconds."""
        pool = self.pool
        return {"steps": self.steps, "registered": len(pool.host), "resident": len(pool.slots),
                "swaps": pool.swaps, "swap_seconds": pool.swap_seconds,
                "swap_ms_mean": 1000 * pool.swap_seconds / pool.swaps if pool.swaps else 0.0}

    # ---- running ----
    def step(self) -> bool:
        """Admit waiting requests, run one decode step over the batch; True while work remains."""
        with self._lock, torch.no_grad():
            self._leave([i for i, r in enumerate(self._rows) if r.handle.cancelled], "cancelled")
            self._admit()
            if self._rows:
                self._decode()
                self.steps += 1
            return bool(self._rows or self._queue)

    def _admit(self) -> None:
        while len(self._rows) < self.max_batch:
            with self._wake:
                if not self._queue:
                    return
                handle = self._queue[0]
                if handle.cancelled:
                    self._queue.popleft().finish("cancelled")
                    continue
                if handle.request.adapter is not None and handle.request.adapter not in self.pool.host:
                    self._queue.popleft().finish("cancelled", "its adapter was removed")
                    continue
                slot = self.pool.acquire(handle.request.adapter)
                if slot is None:  # every resident adapter is busy: wait for a row to leave
                    return
                self._queue.popleft()
            self._prefill(handle, slot)

    def _prefill(self, handle: Handle, slot: int) -> None:
        graphed = self.graphs.run(handle.prompt_ids, slot) if self.graphs is not None else None
        if graphed is None:
            ids = torch.tensor([handle.prompt_ids], device=self.device)
            with self.pool.bank.using([slot]):
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            graphed = out.logits[0, -1], output_cache(out)
        logits, cache = graphed
        request = handle.request
        row = _Row(handle, slot, TextStream(self.tokenizer, request.stop), row_generator(request.seed))
        self._batch.join(cache, len(handle.prompt_ids))
        self._rows.append(row)
        if self._emit(row, logits):
            self._leave([len(self._rows) - 1], None)

    def _decode(self) -> None:
        ids = torch.tensor([[r.last] for r in self._rows], device=self.device)
        mask, positions = self._batch.step_inputs()
        with self.pool.bank.using([r.slot for r in self._rows]):  # outside, the model is the plain base
            out = self.model(input_ids=ids, attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), use_cache=True,
                             **{self.cache_kw: self._batch.cache})
        logits = out.logits[:, -1]
        done = [i for i, row in enumerate(self._rows) if self._emit(row, logits[i])]
        self._leave(done, None)

    def _emit(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose the row's next token and stream it; True when the row is finished."""
        request, handle = row.handle.request, row.handle
        token = choose(logits, request.temperature, request.top_p, row.generator)
        handle.token(token)
        if token in self.eos:
            return self._finish(row, "stop")
        handle.piece(row.stream.push(token))
        if row.stream.stopped:
            return self._finish(row, "stop")
        if handle.usage["completion_tokens"] >= request.max_new_tokens:
            return self._finish(row, "length")
        row.last = token
        return False

    def _finish(self, row: _Row, reason: str) -> bool:
        row.handle.piece(row.stream.flush())
        row.handle.finish(reason)
        return True

    def _leave(self, indices: list[int], reason: str | None) -> None:
        """Take rows out of the batch (finishing them with `reason` when given)."""
        if not indices:
            return
        gone = set(indices)
        for i in sorted(gone):
            row = self._rows[i]
            if reason is not None:
                row.handle.finish(reason)
            self.pool.release(row.handle.request.adapter)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    # ---- background thread ----
    def start(self) -> "Engine":
        """Run `step()` in a background thread while there is work; idle otherwise."""
        if self.is_running():
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="petkit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; requests still waiting or running finish as cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._thread = None
        with self._lock:
            self._leave(list(range(len(self._rows))), "cancelled")
            with self._wake:
                while self._queue:
                    self._queue.popleft().finish("cancelled")

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception as err:  # a failed forward must not hang every waiting client
                LOG.exception("engine step failed")
                self._fail(err)
                busy = False
            if not busy:
                with self._wake:
                    if not self._queue and not self._stopping:
                        self._wake.wait(timeout=0.5)

    def _fail(self, err: Exception) -> None:
        with self._lock:
            for row in self._rows:
                row.handle.finish("error", f"{type(err).__name__}: {err}")
            self._leave(list(range(len(self._rows))), None)


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The tokenizer's chat template applied to `messages`, with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template: send a plain prompt instead of messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}
