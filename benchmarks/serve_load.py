"""Bounded load test of `petkit serve` (docs/serving.md, "Load test"): loopback only, a fixed
number of requests and a time limit, stops by itself.

    nice -n 10 python benchmarks/serve_load.py                 # smollm2-135m, 32 clients, 8 adapters
    python benchmarks/serve_load.py --clients 4 --requests 1   # a quick look

Protocol: `--adapters` rank-8 LoRA adapters on q_proj/v_proj with random non-zero factors (seeded)
are saved to a temp folder; `petkit serve --adapter-dir` runs as its own process on 127.0.0.1 at
a free port (--max-adapters = --adapters, so all stay resident; --max-batch 16). First every
distinct request (adapter x prompt) is served alone, one at a time: the reference answers. Then
`--clients` threads start together, each sending `--requests` chat requests in turn through the
`openai` client (client i on adapter i mod N, one of `--prompts` prompts; streamed and whole
alternate), greedy, `--tokens` new tokens at most. Reported: errors, answers that differ from the reference,
latency per request (p50, p99: request sent -> last token), generated tokens per second over
the loaded phase's wall time. Requests not sent before `--duration` seconds are counted as
skipped; the server is stopped at the end whatever happened.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch

import petkit as pk
from petkit.models.loading import load_model

PROMPTS = ["What is the capital of France?", "Give me a tip for learning to cook.",
           "Name three colours of the rainbow.", "Why is the sky blue?",
           "Write one sentence about the sea.", "What do cats like to eat?",
           "How do I boil an egg?", "Tell me a fact about the moon."]


def make_adapters(model_name: str, folder: Path, count: int) -> None:
    """`count` seeded random LoRA adapters a0.. saved under `folder`."""
    model, _ = load_model(model_name)
    for i in range(count):
        pk.attach(model, pk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]), name=f"a{i}", seed=i)
        with torch.no_grad():
            g = torch.Generator().manual_seed(100 + i)
            for p in pk.trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        pk.save_adapter(model, folder / f"a{i}", name=f"a{i}")
        pk.detach(model, f"a{i}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, folder: Path, count: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "petkit", "serve", "--model", model, "--adapter-dir", str(folder),
           "--max-adapters", str(count), "--max-batch", "16", "--max-queue", "128", "--port", str(port)]
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"petkit serve exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("petkit serve did not answer /health within 300 s")


def ask(client: openai.OpenAI, model: str, prompt: str, tokens: int, stream: bool) -> tuple[str, int]:
    """(answer, generated tokens) of one greedy chat request."""
    kw = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
          "temperature": 0}
    if not stream:
        out = client.chat.completions.create(**kw)
        return out.choices[0].message.content, out.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.completion_tokens


def jobs(clients: int, requests: int, adapters: int, prompts: int) -> list[list[tuple[str, str, bool]]]:
    """Per client, its requests in order: (adapter, prompt, streamed)."""
    return [[(f"a{c % adapters}", PROMPTS[(c // adapters + k) % prompts], (c + k) % 2 == 0)
             for k in range(requests)] for c in range(clients)]


def load_phase(url: str, plan: list[list[tuple[str, str, bool]]], reference: dict, tokens: int,
               duration: float) -> dict:
    records: list[dict] = []
    lock, start = threading.Lock(), threading.Barrier(len(plan))
    stop_at: list[float] = []

    def client_run(work: list[tuple[str, str, bool]]) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=duration)
        start.wait()
        for model, prompt, stream in work:
            if time.monotonic() > stop_at[0]:
                with lock:
                    records.append({"skipped": True})
                continue
            t0 = time.perf_counter()
            try:
                text, made = ask(client, model, prompt, tokens, stream)
                rec = {"seconds": time.perf_counter() - t0, "tokens": made,
                       "correct": text == reference[(model, prompt)]}
            except Exception as err:  # counted, not raised: the report says how many
                rec = {"error": f"{type(err).__name__}: {err}"}
            with lock:
                records.append(rec)

    stop_at.append(time.monotonic() + duration)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(client_run, plan))
    return summarise(records, time.perf_counter() - t0)


def summarise(records: list[dict], wall: float) -> dict:
    done = [r for r in records if "seconds" in r]
    lat = sorted(r["seconds"] for r in done)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else None
    return {"requests": len(records), "answered": len(done),
            "errors": sum("error" in r for r in records), "skipped": sum("skipped" in r for r in records),
            "wrong": sum(not r["correct"] for r in done),
            "latency_p50_s": statistics.median(lat) if lat else None, "latency_p99_s": p99,
            "tokens": sum(r["tokens"] for r in done), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "first_errors": [r["error"] for r in records if "error" in r][:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1, help="requests per client")
    ap.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1),
                    metavar=f"1..{len(PROMPTS)}", help="distinct prompts per adapter")
    ap.add_argument("--tokens", type=int, default=8, help="max new tokens per request")
    ap.add_argument("--duration", type=float, default=900.0, help="no request is sent after this (s)")
    ap.add_argument("--output", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the server process does the work; this one only builds adapters
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(args.model, Path(tmp), args.adapters)
        port = free_port()
        server = start_server(args.model, Path(tmp), args.adapters, port)
        url = f"http://127.0.0.1:{port}"
        try:
            plan = jobs(args.clients, args.requests, args.adapters, args.prompts)
            alone = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            t0 = time.perf_counter()
            distinct = sorted({(m, p) for work in plan for m, p, _ in work})
            reference = {(m, p): ask(alone, m, p, args.tokens, False)[0] for m, p in distinct}
            alone_s = time.perf_counter() - t0
            load_before = os.getloadavg()[0]
            result = load_phase(url, plan, reference, args.tokens, args.duration)
            result["load_average_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    result.update({"model": args.model, "clients": args.clients, "adapters": args.adapters,
                   "requests_per_client": args.requests, "prompts": args.prompts, "max_tokens": args.tokens,
                   "reference_requests": len(distinct), "reference_s": alone_s,
                   "cpu_count": os.cpu_count()})
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
