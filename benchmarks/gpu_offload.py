"""Offloaded optimiser updates on a GPU: peak GPU memory and tok/s with and without
`--runtime.offload_optimizer=cpu` (docs/offload.md), through `pk.train`.

Cases, each in its own process under a time limit (and all of them under `--budget`):
  full-1b, full-1b-offload        full fine-tuning of TinyLlama-1.1B's shape (every weight trains)
  full-1b-offload-nvme            the offloaded run with its host state in files (`nvme`, TMPDIR)
  full-1b-fp32                    the same on the device with fp32 weights and AdamW state: the
                                  optimiser arithmetic the offloaded run does on the host (fp32
                                  masters), the usual mixed-precision full fine-tune
  lora256-8b, lora256-8b-offload  LoRA r 256 (alpha 512) on the 7 linear layers of Llama-3-8B's shape
Random weights in bf16, bf16 autocast, full activation checkpointing, AdamW (lr 1e-5 full,
1e-4 LoRA), grad-norm clip 1.0, linear decay, causal-LM loss on random tokens. Full fine-tuning
keeps the trained weights in bf16 on the device (`delta_dtype: bf16`), the LoRA factors are fp32.
Without offload the optimiser is torch's fused CUDA AdamW over the device weights (state in their
dtype); with it, fused CPU AdamW over fp32 masters on the host. tok/s is pk.train's
`tokens_per_s` over the last `window` steps (the first steps, with allocation and pinning, are
left out); peak is `torch.cuda.max_memory_allocated` over the whole process.

    python benchmarks/gpu_offload.py --out offload.json      # all four cases (~3 min on an H100)
    python benchmarks/gpu_offload.py --cases full-1b full-1b-offload
    python benchmarks/gpu_offload.py --smoke                 # tiny shapes on the CPU (the check)

On the CPU the option is a no-op (the optimiser state already lives there), so `--smoke`
checks the script and that both arms train, not the offload itself (tests/test_offload.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train import TARGETS, build_model  # noqa: E402  (one random-weight Llama builder)
from gpu_train_runs import run_cases  # noqa: E402  (each case in its own worker process)

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2, batch=2, seq=64,
                 accum=2, steps=4, window=2),
    "1b": dict(vocab=32000, hidden=2048, inter=5632, layers=22, heads=32, kv=4, batch=4, seq=1024,
               accum=16, steps=5, window=2),
    "8b": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv=8, batch=1,
               seq=2048, accum=8, steps=4, window=2),
}
# case: (shape, what trains, offload, seconds allowed)
CASES: dict[str, tuple[str, str, str, float]] = {
    "full-1b": ("1b", "full", "none", 60.0),
    "full-1b-fp32": ("1b", "full32", "none", 70.0),
    "full-1b-offload": ("1b", "full", "cpu", 75.0),
    "full-1b-offload-nvme": ("1b", "full", "nvme", 90.0),
    "lora256-8b": ("8b", "lora256", "none", 90.0),
    "lora256-8b-offload": ("8b", "lora256", "cpu", 90.0),
}
def worker(case: str, device: str, smoke: bool) -> dict[str, Any]:
    """One case in this process: train, then report tok/s, peak memory and the loss."""
    import torch

    import petkit as pk

    name, trains, offload, _ = CASES[case]
    shape = SHAPES["tiny" if smoke else name]
    model = build_model(shape, device)
    if trains.startswith("full"):
        for param in model.parameters():
            param.requires_grad_(True)
        params, lr = dict(model.named_parameters()), 1e-5
    else:
        torch.manual_seed(0)
        pk.attach(model, pk.LoraConfig(r=256, alpha=512, dropout=0.0, targets=TARGETS))
        params, lr = None, 1e-4
    gen = torch.Generator().manual_seed(1)
    rows = shape["batch"] * shape["accum"] * shape["steps"]
    ids = torch.randint(0, shape["vocab"], (rows, shape["seq"]), generator=gen)
    config = pk.TrainConfig(
        lr=lr, max_steps=shape["steps"], batch_size=shape["batch"], grad_accum=shape["accum"],
        log_every=shape["window"], schedule="linear", progress=False,
        runtime={"device": device, "precision": "bf16", "activation_checkpointing": "full",
                 "offload_optimizer": offload,  # full: the weights stay bf16 on the device
                 "delta_dtype": "bf16" if trains == "full" else "fp32"})  # full32: fp32 weights
    started = time.perf_counter()
    result = pk.train(model, [{"input_ids": r, "labels": r} for r in ids], config,
                      parameters=params)
    cuda = device.startswith("cuda")
    return {"case": case, "tok_s": result.tokens_per_s, "loss": result.history[-1]["train_loss"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "offloaded": result.report.get("offload_optimizer", "none"),
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "run_s": round(time.perf_counter() - started, 1),
            **{k: v for k, v in result.report.items() if k.endswith("_s") and k.startswith("offload")}}


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case in a fresh process under its time limit, within the overall budget."""
    def command(case: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--worker", case, "--device",
                args.device] + (["--smoke"] if args.smoke else [])
    return run_cases(args.cases, args.budget, command, lambda case, left: min(CASES[case][3], left),
                     args.out, {"args": vars(args)})


def _ratios(r: dict[str, Any], base: dict[str, Any] | None) -> tuple[str, str]:
    if not base or base is r or not base["tok_s"] or not base["peak_gib"]:
        return "-", "-"
    return f"{r['tok_s'] / base['tok_s']:.2f}", f"{r['peak_gib'] / base['peak_gib']:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; each offloaded case against the same case without offload (and a line
    against each other baseline of its shape, e.g. the fp32-weight one)."""
    done = {r["case"]: r for r in rows if "error" not in r}
    lines = ["| case | trained params | offloaded | tok/s | peak GiB | x tok/s | x peak | loss |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error'][:90]} | | | | | | |")
            continue
        base = done.get(r["case"].split("-offload")[0])
        ratio = _ratios(r, base)
        lines.append(f"| {r['case']} | {r['trained_params'] / 1e6:,.1f}M | {r['offloaded']} | "
                     f"{r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {ratio[0]} | {ratio[1]} | "
                     f"{r['loss']:.4f} |")
        if base is None or base is r:
            continue
        for other in sorted(c for c in done if c.startswith(base["case"] + "-") and c != r["case"]):
            ratio = _ratios(r, done[other])
            lines.append(f"| {r['case']} vs {other} | | | | | {ratio[0]} | {ratio[1]} | |")
    return "\n".join(lines)


def main() -> None:
    """Parse; run one case (`--worker`) or the cases asked for, then print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for all cases")
    parser.add_argument("--out", help="write the rows to this JSON file (after every case)")
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, args.smoke)))
        return
    rows = run_all(args)
    print(table(rows))
    if any("error" in r for r in rows) and args.smoke:
        sys.exit(1)


if __name__ == "__main__":
    main()
