"""Batched multi-adapter decoding on CPU (docs/serving.md, "Batched multi-adapter decoding").

    nice -n 10 python benchmarks/serve_cpu.py                      # smollm2-135m, 16 x 16, 32 tokens
    python benchmarks/serve_cpu.py --requests 4 --new-tokens 8     # a quick look

Protocol: SmolLM2-135M in fp32 on this machine's CPU threads; `--requests` concurrent requests
(distinct prompts of about 10 tokens, greedy, exactly `--new-tokens` new tokens each: EOS is
ignored so every arm makes the same tokens). Each of the 16 adapters is a rank-8 LoRA on q_proj and
v_proj with random non-zero factors, saved and loaded through adapter folders. Arms:

  base            the serving engine, every request on the base (no adapter registered)
  engine          the serving engine, request i on adapter i (all resident: --max-adapters 16)
  grouped         today's group-by-adapter path: per adapter, activate it and `generate` its rows
  mixed_generate  pk.mixed_generate, now one batched `generate` over every row

tokens/s = generated tokens / wall time of the arm (prefill included); base and engine alternate
`--rounds` times and the median is reported (the machine is shared: alternating keeps a change of
load from favouring one arm). One torch thread by default: on a loaded 2-core machine two threads
spin-wait for each other and every arm runs several times slower. Time to first token (TTFT):
one request alone on an idle engine, its adapter already resident, median of `--ttft-runs`
(alternating with the same request on the base). Adapter swap cost: the mean time to copy one adapter's factors into
a free slot of the batched stacks (host -> device), from the engine's own counters.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import petkit as pk
from petkit.models.loading import load_model
from petkit.serve.engine import Engine, GenerationRequest

TOPICS = ["the weather", "a good book", "learning to cook", "the ocean", "mountains", "city life",
          "a small dog", "music lessons", "the night sky", "gardening", "trains", "old castles",
          "chess", "the desert", "a rainy day", "coffee"]


def make_adapters(model: torch.nn.Module, folder: Path, count: int, rank: int) -> dict[str, Path]:
    paths = {}
    for i in range(count):
        name = f"a{i}"
        pk.attach(model, pk.LoraConfig(r=rank, alpha=2 * rank, targets=["q_proj", "v_proj"]), name=name, seed=i)
        with torch.no_grad():
            g = torch.Generator().manual_seed(100 + i)
            for p in pk.trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths[name] = pk.save_adapter(model, folder / name, name=name)
        pk.detach(model, name)
    return paths


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(f"Write two sentences about {TOPICS[i % len(TOPICS)]} for a friend.").input_ids
            for i in range(n)]


class Clock:
    """Wall and CPU seconds of a block; rate() is tokens per wall second and per CPU second."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rate(self, tokens: int) -> dict[str, float]:
        return {"wall": tokens / self.wall, "cpu": tokens / self.cpu}


def engine_arm(engine: Engine, prompts: list[list[int]], adapters: list[str | None], tokens: int) -> dict[str, float]:
    with Clock() as clock:
        handles = [engine.submit(GenerationRequest(prompt_ids=p, adapter=a, max_new_tokens=tokens))
                   for p, a in zip(prompts, adapters)]
        while engine.step():
            pass
    made = sum(h.usage["completion_tokens"] for h in handles)
    assert made == tokens * len(prompts), made
    return clock.rate(made)


def padded(tokenizer, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def generate_kw(tokenizer, tokens: int) -> dict:
    return {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id}


def grouped_arm(model, tokenizer, prompts, names, tokens: int) -> dict[str, float]:
    """Today's mixed_generate before batching: one `generate` per adapter group."""
    with Clock() as clock, torch.no_grad():
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            pk.activate(model, [name])
            model.generate(**padded(tokenizer, [prompts[i] for i in rows]), **generate_kw(tokenizer, tokens))
    return clock.rate(tokens * len(prompts))


def mixed_arm(model, tokenizer, prompts, names, tokens: int) -> dict[str, float]:
    with Clock() as clock:
        pk.mixed_generate(model, names, **padded(tokenizer, prompts), **generate_kw(tokenizer, tokens))
    return clock.rate(tokens * len(prompts))


def ttft(engine: Engine, prompt: list[int], adapter: str | None) -> dict[str, float]:
    with Clock() as clock:
        engine.submit(GenerationRequest(prompt_ids=prompt, adapter=adapter, max_new_tokens=1))
        while engine.step():
            pass
    return {"wall": clock.wall, "cpu": clock.cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="base / engine arms alternate this many times")
    ap.add_argument("--ttft-runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    n = args.requests
    prompts, names = prompt_ids(tokenizer, n), [f"a{i}" for i in range(n)]
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), n, args.rank)
        # the base engine gets its own copy: the other engine's hooks sit on `model`'s layers
        base_engine = Engine(copy.deepcopy(model), tokenizer, max_batch=n, max_adapters=1, max_queue=4 * n)
        engine = Engine(model, tokenizer, max_batch=n, max_adapters=n, max_queue=4 * n)
        for name in names:
            engine.add_adapter(name, paths[name])
        for e in (base_engine, engine):
            e.eos = set()  # every arm makes exactly --new-tokens tokens
            engine_arm(e, prompts[:2], [None, names[0]] if e is engine else [None, None], 2)  # warm-up
        base, batched, t_base, t_adapter = [], [], [], []
        for _ in range(args.rounds):  # alternate, so a change in machine load hits both arms
            base.append(engine_arm(base_engine, prompts, [None] * n, args.new_tokens))
            batched.append(engine_arm(engine, prompts, names, args.new_tokens))
        for _ in range(args.ttft_runs):
            t_base.append(ttft(base_engine, prompts[0], None))
            t_adapter.append(ttft(engine, prompts[0], names[0]))
        stats = engine.stats()
        engine.pool.bank.close()
        del engine, base_engine
        for name in names:
            pk.load_adapter(model, paths[name], name=name)
        grouped = grouped_arm(model, tokenizer, prompts, names, args.new_tokens)
        mixed = mixed_arm(model, tokenizer, prompts, names, args.new_tokens)
    result = {"model": args.model, "requests": n, "new_tokens": args.new_tokens, "rank": args.rank,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "swap_ms_mean": stats["swap_ms_mean"]}
    for clock in ("wall", "cpu"):  # tokens per wall second, per CPU second of this process
        b, e = [r[clock] for r in base], [r[clock] for r in batched]
        result[clock] = {
            "tokens_per_s": {"base": med(b), "engine": med(e), "grouped": grouped[clock], "mixed_generate": mixed[clock]},
            "rounds": {"base": b, "engine": e},
            "engine_vs_base": med([y / x for x, y in zip(b, e)]),  # median of the paired rounds' ratios
            "engine_vs_grouped": med(e) / grouped[clock],
            "ttft_ms": {"base": 1000 * med([t[clock] for t in t_base]),
                        "adapter": 1000 * med([t[clock] for t in t_adapter])},
            "ttft_ratio": med([a[clock] / b_[clock] for a, b_ in zip(t_adapter, t_base)])}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
