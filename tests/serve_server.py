"""Shared set-up of the serve tests: a tiny chat model with deterministic adapters, and a real
uvicorn server on a free 127.0.0.1 port in a thread, torn down at the end."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import petkit as pk

BASE = "tiny-llama"


def tiny_chat_model(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A 2-layer random Llama with SmolLM2's tokenizer (and chat template): fast, and its text
    is real text, so prompts and stop strings behave as with a real model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from petkit.models.embedded.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id or 0,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Larger weights than the default init, so greedy answers differ between adapters.
        for param in model.parameters():
            param.data.mul_(8.0)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def save_adapters(model: torch.nn.Module, folder: Path, names: list[str], r: int = 4,
                  scale: float = 0.5) -> dict[str, Path]:
    """LoRA adapters with random A and non-zero B (normal, std `scale`, seeded by position in
    `names`), each saved to folder/name: deterministic, and each changes the model's answers."""
    out = {}
    for i, name in enumerate(names):
        pk.attach(model, pk.LoraConfig(r=r, alpha=2 * r, targets=["q_proj", "v_proj", "o_proj"]),
                  name=name, seed=i)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + i)
            for param in pk.trainable_parameters(model).values():
                param.normal_(0.0, scale)
        out[name] = pk.save_adapter(model, folder / name, name=name)
        pk.detach(model, name)
    return out


def free_socket() -> socket.socket:
    """A listening-ready socket bound to 127.0.0.1 on a port the OS picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, ws="none",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
