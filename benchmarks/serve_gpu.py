"""Batched multi-adapter decoding on one GPU (docs/serving_engine.md, "Batched multi-adapter decoding").

    python benchmarks/serve_gpu.py --out serve_gpu.json

Protocol: a random-weight Llama of TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632,
32 heads / 4 KV heads, vocab 32000) in bf16 on one GPU, served by the engine. Each request has a
distinct 64-token random prompt and makes exactly `--new-tokens` tokens (EOS ignored), greedy.

  base       64 requests on the base (its own copy of the weights, no hooks, no adapter)
  engine     request i on adapter i: 64 distinct rank-16 LoRAs (q_proj, v_proj), all resident
  swapping   1,000 adapters registered, `--max-adapters` resident; each of 3 waves of 64 requests
             names 64 adapters not used before, so every row first swaps its adapter in
  grouped    per-group generation: one adapter attached as petkit LoRA wrappers, HF `generate` of
             one request (a group of one row); its tokens/s is the same for each group run in turn

base and engine waves alternate (`--repeats`, after a full warm-up wave of each) and their
medians are compared; time to first token alternates one-request runs likewise (`--ttft-runs`),
with the engines' CUDA-graph prefills (serve.prefill_graphs, the default) and, on the same two
engines with the graphs taken away, eager prefills; `--ttft-lengths` repeats both at other prompt
lengths.
decode tok/s counts the steps after every row was admitted (pure decode over the full batch);
total tok/s includes the prefills. The 1,000 adapters are registered from memory through the
pool (no adapter folders: loading a folder fingerprints the base, the same for every adapter).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import petkit as pk
from petkit.core.capabilities import RowTerms
from petkit.serve.engine import Engine, GenerationRequest
from petkit.serve.prefill_graphs import PrefillGraphs

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def tiny_llama_shape(smoke: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if smoke else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22)
    config = LlamaConfig(**size, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def random_terms(model: torch.nn.Module, rank: int) -> dict[str, RowTerms]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(model.config.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            layer = getattr(model.model.layers[i].self_attn, proj)
            a = torch.randn(rank, layer.in_features, generator=g) * 0.02
            b = torch.randn(layer.out_features, rank, generator=g) * 0.02
            out[f"model.layers.{i}.self_attn.{proj}"] = RowTerms(a.bfloat16(), b.bfloat16(), 2.0)
    return out


def variant(terms: dict[str, RowTerms], i: int) -> dict[str, RowTerms]:
    """Adapter i: its own host copy of the factors (rolled and scaled: distinct, cheap to make)."""
    return {p: RowTerms(t.a.roll(i, dims=1) * (1 + i / 1000), t.b.roll(i, dims=0), t.scale)
            for p, t in terms.items()}


def run_wave(engine: Engine, prompts: list[list[int]], names: list[str | None], tokens: int) -> dict:
    sync()
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(prompt_ids=p, adapter=a, max_new_tokens=tokens))
               for p, a in zip(prompts, names)]
    engine.step()  # admits (prefills) every row, and the first decode step
    sync()
    admitted = time.perf_counter()
    while engine.step():
        pass
    sync()
    done = time.perf_counter()
    made = sum(h.usage["completion_tokens"] for h in handles)
    assert made == tokens * len(prompts), made
    decode_tokens = len(prompts) * (tokens - 2)  # the first step made 2 tokens per row
    return {"total_tok_s": made / (done - started), "decode_tok_s": decode_tokens / (done - admitted)}


def engine_for(model, adapters: int, graphs: bool = True) -> Engine:
    engine = Engine(model, None, max_batch=64, max_adapters=max(1, adapters), max_queue=256,
                    cuda_graphs=graphs)
    engine.eos = set()
    return engine


def ttft(engine: Engine, prompt: list[int], adapter: str | None, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        h = engine.submit(GenerationRequest(prompt_ids=prompt, adapter=adapter, max_new_tokens=1))
        while engine.step():
            pass
        times.append(h.first_token_at - h.submitted_at)
    return 1000 * statistics.median(times)


def ttft_pair(base: Engine, engine: Engine, prompt: list[int], adapter: str, runs: int) -> dict:
    """Median time to first token, base and adapter alternating, in four modes on the same two
    engines: their graphed prefills (the default: one graph per adapter slot, siblings' shrinks in
    one GEMM, expands in place), eager prefills (graphs taken away), the per-slot graphs without
    that sharing (`_serial`: the default before 2026-12-08) and one graph per bucket for every
    slot, through the fused row kernel where triton is installed (`_kernel`)."""
    graphs = base.graphs, engine.graphs
    other = {} if engine.graphs is None else {
        "_serial": PrefillGraphs(engine.model, engine.pool.bank, share=False),
        "_kernel": PrefillGraphs(engine.model, engine.pool.bank, per_slot=False)}
    modes = {"": graphs, "_eager": (None, None), **{k: (base.graphs, other.get(k)) for k in ("_serial", "_kernel")}}
    times: dict[str, list[float]] = {}
    for i in range(runs + 1):  # the first round captures the graphs: left out
        for suffix, (base.graphs, engine.graphs) in modes.items():
            for kind, e, name in (("base", base, None), ("adapter", engine, adapter)):
                took = ttft(e, prompt, name, runs=1)
                if i:
                    times.setdefault(f"ttft_ms_{kind}{suffix}", []).append(took)
    base.graphs, engine.graphs = graphs
    out = {k: statistics.median(v) for k, v in times.items()}
    for suffix in modes:
        out["ratio" + suffix] = out[f"ttft_ms_adapter{suffix}"] / out[f"ttft_ms_base{suffix}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--registered", type=int, default=1000)
    ap.add_argument("--max-adapters", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternating base/engine waves")
    ap.add_argument("--ttft-runs", type=int, default=11)
    ap.add_argument("--ttft-lengths", type=int, nargs="*", default=[16, 256, 1024],
                    help="other prompt lengths for time to first token (5 alternating runs each)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model and few adapters: check the script")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.new_tokens, args.registered, args.max_adapters = 4, 4, 20, 4
        args.repeats, args.ttft_runs = 1, 3
    model = tiny_llama_shape(args.smoke)
    proto = random_terms(model, args.rank)
    g = torch.Generator().manual_seed(1)
    n = args.rows
    prompts = [torch.randint(10, 32000, (64,), generator=g).tolist() for _ in range(n)]
    res: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "rows": n, "new_tokens": args.new_tokens, "rank": args.rank}

    # The base runs on its own copy of the weights with no hooks at all; the engine's copy carries
    # the bank's hooks. Waves alternate (base, engine) after a full warm-up wave of each, so both
    # see the same warm machine; the medians are compared.
    base = engine_for(model, 0)
    engine = engine_for(copy.deepcopy(model), n)
    for i in range(n):
        engine.pool.register(f"a{i}", variant(proto, i), "lora")
    names = [f"a{i}" for i in range(n)]
    run_wave(base, prompts, [None] * n, 8)
    run_wave(engine, prompts, names, 8)
    waves: dict[str, list[dict]] = {"base": [], "engine": []}
    for _ in range(args.repeats):
        waves["base"].append(run_wave(base, prompts, [None] * n, args.new_tokens))
        waves["engine"].append(run_wave(engine, prompts, names, args.new_tokens))
    for kind, runs in waves.items():
        res[kind] = {k: statistics.median(w[k] for w in runs) for k in runs[0]}
        res[kind + "_waves"] = runs
    res.update(ttft_pair(base, engine, prompts[0], names[0], args.ttft_runs))
    res["ttft_by_length"] = {}
    for length in args.ttft_lengths:
        prompt = torch.randint(10, 32000, (length,), generator=g).tolist()
        res["ttft_by_length"][length] = ttft_pair(base, engine, prompt, names[0], 5)
    res["prefill_graphs"] = all(e.graphs is not None and e.graphs.enabled for e in (base, engine))
    engine.pool.bank.close()
    del engine

    swap = engine_for(model, args.max_adapters)
    started = time.perf_counter()
    for i in range(args.registered):
        swap.pool.register(f"s{i}", variant(proto, n + i), "lora")
    res["register_s"] = time.perf_counter() - started
    waves = [run_wave(swap, prompts, [f"s{w * n + i}" for i in range(n)], args.new_tokens) for w in range(3)]
    res["swapping"] = {k: statistics.median(w[k] for w in waves) for k in waves[0]}
    res["swap_stats"] = swap.stats()
    swap.pool.bank.close()
    del swap

    pk.attach(model, pk.LoraConfig(r=args.rank, targets=["q_proj", "v_proj"]), name="g")
    ids = torch.tensor([prompts[0]], device=DEV)
    kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
          "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        sync()
        started = time.perf_counter()
        groups = 4
        for _ in range(groups):
            model.generate(ids, **kw)
        sync()
    res["grouped_tok_s"] = groups * args.new_tokens / (time.perf_counter() - started)
    res["engine_vs_base_decode"] = res["engine"]["decode_tok_s"] / res["base"]["decode_tok_s"]
    res["engine_vs_grouped_total"] = res["engine"]["total_tok_s"] / res["grouped_tok_s"]
    res["ttft_ratio"] = res["ttft_ms_adapter"] / res["ttft_ms_base"]
    res["ttft_ratio_eager"] = res["ttft_ms_adapter_eager"] / res["ttft_ms_base_eager"]
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
