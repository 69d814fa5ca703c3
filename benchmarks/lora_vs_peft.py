"""petkit LoRA vs Hugging Face PEFT LoRA: same model, data, batch, rank, optimiser, in one run.

Each library trains in its own subprocess (so peak memory is its own), the two alternating
(`--rounds`, best of each kept, so slow drift of a shared machine hits both); the parent prints
median step time (wall clock, and CPU time of the process: steadier on a shared machine) and
peak memory with ratios petkit/peft (goal: both <= 1.0).

    python benchmarks/lora_vs_peft.py                         # CPU, smollm2-135m
    python benchmarks/lora_vs_peft.py --device cuda --model llama-1b --batch 8 --seq 512 --compile
    python benchmarks/lora_vs_peft.py --rounds 1 --steps 2 --warmup 1 --profile   # op counts that differ
    python benchmarks/lora_vs_peft.py --paired 30                             # steps alternating in one process
    python benchmarks/lora_vs_peft.py --layer-reps 300                        # the LoRA path alone, per layer
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples this process's RSS every 2 ms; `.peak` is the highest seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = _rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)


def build_model(name: str, device: str, dtype):
    import torch

    if name == "llama-1b":  # random weights: fine for speed and memory
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(dtype)
    from petkit.models import load_model

    return load_model(name, dtype=dtype)[0].to(device)


def setup(args: argparse.Namespace, lib: str) -> tuple:
    """(model or its compiled forward, AdamW over the LoRA factors, 4 random batches) for one library."""
    import torch

    device, dtype = args.device, getattr(torch, args.dtype)
    model = build_model(args.model, device, dtype)
    model.config.use_cache = False
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if args.all_linear else ["q_proj", "v_proj"]
    if lib == "petkit":
        import petkit as pk

        pk.attach(model, pk.LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0, targets=targets))
        params = list(pk.trainable_parameters(model).values())
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    return fwd, opt, batches


def train_step(fwd, opt, ids) -> "torch.Tensor":
    loss = fwd(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def worker(args: argparse.Namespace) -> dict:
    import torch

    fwd, opt, batches = setup(args, args.lib)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss()
    sampler = PeakRSS()
    sampler.start()
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(fwd, opt, ids)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    sampler.running = False
    sampler.join()
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak - base_rss
    result = {"lib": args.lib, "median_step_s": statistics.median(times), "median_cpu_s": statistics.median(cpu_times),
              "peak_bytes": peak, "loss": float(loss)}
    if args.profile:  # one more step, after the timed ones, under torch.profiler: aten op counts
        from torch.profiler import profile

        with profile() as prof:
            train_step(fwd, opt, ids)
        result["ops"] = {e.key: [e.count, e.self_cpu_time_total / 1e3] for e in prof.key_averages()}
    return result


def print_profile(results: dict) -> None:
    """The ops whose call counts differ between the two libraries, and each library's totals."""
    ops = {lib: results[lib]["ops"] for lib in ("peft", "petkit")}
    print("\nprofiled step (torch.profiler, one step after the timed ones):")
    for lib, table in ops.items():
        calls = sum(c for c, _ in table.values())
        self_ms = sum(t for _, t in table.values())
        print(f"  {lib}: {calls} op calls, {self_ms:.0f} ms self CPU")
    print("| op | peft calls | petkit calls | peft self ms | petkit self ms |\n|---|---|---|---|---|")
    for key in sorted(set(ops["peft"]) | set(ops["petkit"])):
        a, b = ops["peft"].get(key, [0, 0.0]), ops["petkit"].get(key, [0, 0.0])
        if a[0] != b[0]:
            print(f"| {key[:60]} | {a[0]} | {b[0]} | {a[1]:.1f} | {b[1]:.1f} |")


def paired_bench(args: argparse.Namespace) -> None:
    """Both libraries' models in one process, single steps alternating (order swapped every pair):
    load drift of a shared machine hits both alike, so the per-pair ratios are steadier than whole
    runs. Time only; peak memory needs the separate processes of the default mode."""
    import torch

    libs = {lib: setup(args, lib) for lib in ("peft", "petkit")}
    wall: dict[str, list[float]] = {lib: [] for lib in libs}
    cpu: dict[str, list[float]] = {lib: [] for lib in libs}
    for step in range(args.warmup + args.paired):
        for lib in (("peft", "petkit") if step % 2 else ("petkit", "peft")):
            fwd, opt, batches = libs[lib]
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(fwd, opt, batches[step % len(batches)])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= args.warmup:
                wall[lib].append(time.perf_counter() - t0)
                cpu[lib].append(time.process_time() - c0)
    print(f"model={args.model} device={args.device} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"rank={args.rank} all_linear={args.all_linear}: {args.paired} pairs of steps in one process")
    for name, table in (("wall", wall), ("CPU", cpu)):
        ratios = [b / a for a, b in zip(table["peft"], table["petkit"])]
        print(f"step {name} time: median peft {statistics.median(table['peft']):.4f} s, petkit "
              f"{statistics.median(table['petkit']):.4f} s; petkit/peft per pair: median {statistics.median(ratios):.4f}, "
              f"mean {statistics.mean(ratios):.4f} +- {statistics.stdev(ratios) / len(ratios) ** 0.5:.4f} (s.e.)")


def layer_bench(args: argparse.Namespace) -> None:
    """The LoRA path alone, per layer: forward + backward of the wrapped layer minus the bare one.

    The model's first q_proj and v_proj (real shapes) are copied three times: bare, petkit-wrapped,
    PEFT-wrapped; the three run in rotated order every repetition and the medians of
    (wrapped - bare) are printed. Far less noisy than whole steps, where the LoRA path is ~1% of the time."""
    import copy

    import peft
    import petkit as pk
    import torch

    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    print(f"| layer (in -> out), {args.batch}x{args.seq} tokens | bare fwd+bwd (ms) | petkit LoRA path (ms) | PEFT LoRA path (ms) | ratio |")
    print("|---|---|---|---|---|")
    for target in ("q_proj", "v_proj"):
        base = next(m for n, m in model.named_modules() if n.endswith(target))
        layers = {}
        for lib in ("bare", "petkit", "peft"):
            holder = torch.nn.Module()
            holder.lin = copy.deepcopy(base).requires_grad_(False)
            if lib == "petkit":
                pk.attach(holder, pk.LoraConfig(r=args.rank, alpha=2 * args.rank, targets=["lin"]))
            elif lib == "peft":
                peft.inject_adapter_in_model(peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["lin"]), holder)
            layers[lib] = holder.lin
        x = torch.randn(args.batch, args.seq, base.in_features, device=args.device, dtype=base.weight.dtype, requires_grad=True)
        grad = torch.randn(args.batch, args.seq, base.out_features, device=args.device, dtype=base.weight.dtype)
        times: dict[str, list[float]] = {lib: [] for lib in layers}
        order = list(layers)
        for rep in range(args.layer_reps):
            for lib in order[rep % 3:] + order[:rep % 3]:  # rotated: none always runs right after another
                t0 = time.perf_counter()
                layers[lib](x).backward(grad)
                times[lib].append(time.perf_counter() - t0)
        over = {lib: statistics.median(t - b for t, b in zip(times[lib], times["bare"])) * 1e3 for lib in ("petkit", "peft")}
        print(f"| {target} ({base.in_features} -> {base.out_features}) | {statistics.median(times['bare']) * 1e3:.3f} | "
              f"{over['petkit']:.3f} | {over['peft']:.3f} | {over['petkit'] / over['peft']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--all-linear", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="runs per library, alternating; best kept")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each; print the ops whose counts differ")
    ap.add_argument("--paired", type=int, default=0, help="instead: this many pairs of steps, both libraries in one process (time only)")
    ap.add_argument("--layer-reps", type=int, default=0, help="instead: time the LoRA path alone, per layer, this many times")
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.lib:
        print(json.dumps(worker(args)))
        return
    if args.paired:
        paired_bench(args)
        return
    if args.layer_reps:
        layer_bench(args)
        return
    results, medians = {}, {"peft": [], "petkit": []}
    for lib in ("peft", "petkit") * args.rounds:  # alternating, best of `rounds` each: drift hits both
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--lib", lib], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        medians[lib].append((r["median_step_s"], r["median_cpu_s"]))
        prev = results.get(lib)
        results[lib] = r if prev is None or r["median_step_s"] < prev["median_step_s"] else prev
    mem = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS growth while training"
    print(f"model={args.model} device={args.device} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"rank={args.rank} compile={args.compile} all_linear={args.all_linear} steps={args.steps}")
    print(f"| library | median step (s) | median step CPU time (s) | {mem} (MiB) | final loss |")
    print("|---|---|---|---|---|")
    for lib in ("peft", "petkit"):
        r = results[lib]
        print(f"| {lib} | {r['median_step_s']:.4f} | {r['median_cpu_s']:.4f} | {r['peak_bytes'] / 2**20:.1f} | {r['loss']:.4f} |")
    t = results["petkit"]["median_step_s"] / results["peft"]["median_step_s"]
    c = results["petkit"]["median_cpu_s"] / results["peft"]["median_cpu_s"]
    m = results["petkit"]["peak_bytes"] / max(results["peft"]["peak_bytes"], 1)
    print(f"ratios petkit/peft: step time {t:.3f}, step CPU time {c:.3f}, peak memory {m:.3f}")
    for i, kind in enumerate(("step", "step CPU time")):
        a, b = ([v[i] for v in medians[lib]] for lib in ("peft", "petkit"))
        ratios = ", ".join(f"{y / x:.3f}" for x, y in zip(a, b))
        print(f"per round, median {kind} (s): peft {[round(v, 4) for v in a]}, petkit {[round(v, 4) for v in b]}; "
              f"ratios {ratios}")
    if args.profile:
        print_profile(results)


if __name__ == "__main__":
    main()
