"""Peak memory of one training step, side by side: forward-only evaluation, MeZO (LoRA),
backprop LoRA (AdamW) and full fine-tuning (AdamW), same model, same batch.

Each mode runs in its own subprocess, so each peak is its own. The peak is taken over the
steps (model resident, loading excluded): on the CPU the kernel's resident-set high-water mark
(VmHWM, reset after loading through /proc/self/clear_refs), on a GPU
`torch.cuda.max_memory_allocated` (reset after loading). Every mode runs `--steps` steps
(optimiser state exists from the first); the loss is the causal-LM loss of the batch
(labels = inputs). The parent prints a table and each peak's ratio to forward-only.

    python benchmarks/zo_memory.py                                  # CPU, smollm2-135m, fp32
    python benchmarks/zo_memory.py --device cuda --model llama-1b --dtype bfloat16 \
        --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any

MODES = ("forward", "mezo", "lora", "full")
LABELS = {"forward": "forward-only eval (no_grad)", "mezo": "MeZO step, LoRA",
          "lora": "backprop step, LoRA + AdamW", "full": "full fine-tuning step, AdamW"}
# A Llama-3.2-1B-shaped model with random weights (1.24 B parameters): fine for memory and speed.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=4096, tie_word_embeddings=True)


def build_model(name: str, device: str, dtype: Any) -> Any:
    """`llama-1b` (random weights) or any name `petkit.models.load_model` knows."""
    import torch

    if name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(dtype)
    from petkit.models import load_model

    return load_model(name, task="causal-lm", dtype=dtype)[0].to(device)


def reset_peak(device: str) -> None:
    """Start a new peak: CUDA's allocator stats, or the kernel's RSS high-water mark."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")


def peak_mib(device: str) -> float:
    """Peak GPU memory allocated, or this process's peak RSS (VmHWM), since the last reset."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status", encoding="ascii") as fh:
        line = next(row for row in fh if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def make_stepper(mode: str, model: Any, steps: int) -> Any:
    """The petkit stepper of `mode` (None for forward-only)."""
    import petkit as pk
    from petkit.training import TrainConfig
    from petkit.training.steppers.backprop import BackpropStepper
    from petkit.training.steppers.zeroth import ZOSettings, ZOStepper

    if mode == "forward":
        return None
    if mode in ("mezo", "lora"):
        pk.attach(model, pk.LoraConfig(r=8, alpha=16))
        params = pk.trainable_parameters(model)
    else:
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
    if mode == "mezo":
        return ZOStepper(params, ZOSettings(lr=1e-6, eps=1e-3, total_steps=steps))
    return BackpropStepper(params, TrainConfig(lr=1e-5, schedule="constant"), steps)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this process: load, run `steps` steps, report peaks and step time."""
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 10000, (args.batch, args.seq), generator=gen).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loaded = peak_mib(args.device)
    reset_peak(args.device)
    stepper = make_stepper(args.mode, model, args.steps)
    model.train(args.mode != "forward")

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**b).loss

    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        if stepper is None:
            with torch.no_grad():
                float(loss_fn(batch))
        else:
            stepper.step([batch], loss_fn)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    params = sum(p.numel() for p in model.parameters())
    return {"mode": args.mode, "peak_mib": peak_mib(args.device), "after_load_mib": loaded,
            "step_s": min(times), "step_cpu_s": min(cpu_times), "parameters": params}


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mode in a fresh subprocess; one JSON line back from each."""
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--model", args.model,
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown table with each mode's peak and its ratio to forward-only."""
    gpu = args.device.startswith("cuda")
    unit = "peak GPU memory allocated" if gpu else "peak RSS"
    clock = "step (s)" if gpu else "step (CPU s)"
    ref = next((r["peak_mib"] for r in rows if r["mode"] == "forward"), None)
    lines = [f"{args.model} ({rows[0]['parameters'] / 1e6:.0f} M params), {args.device}, "
             f"{args.dtype}, batch {args.batch} x {args.seq} tokens, {args.steps} steps",
             "", f"| mode | {unit} (MiB) | x forward-only | peak while loading (MiB) | {clock} |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['peak_mib'] / ref:.2f}" if ref else "-"
        lines.append(f"| {LABELS[r['mode']]} | {r['peak_mib']:.0f} | {ratio} | "
                     f"{r['after_load_mib']:.0f} | {r['step_s' if gpu else 'step_cpu_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse; run one mode (`--worker`) or all of them and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = run_all(args)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
