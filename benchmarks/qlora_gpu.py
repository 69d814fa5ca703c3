"""QLoRA at the Llama-3-8B shape: petkit vs PEFT + bitsandbytes, same base, same run.

    python benchmarks/qlora_gpu.py                 # GPU: 8B shape (random weights), nf4, r16 all-linear,
                                                   # batch 2 x 2048, activation checkpointing
    python benchmarks/qlora_gpu.py --tiny          # CPU smoke test of the same code (tiny shapes)

Each arm runs in its own process (its own peak memory). The base is a randomly initialised
LlamaForCausalLM of the given shape (no download), quantised with petkit's `pk.quantize`
(bitsandbytes `Linear4bit`, nf4, bf16 compute) — both arms get the same bitsandbytes layers.
  petkit: pk.attach(LoraConfig(r=16, alpha=32, targets="all-linear")), then `pk.train` with
          precision bf16 (nothing upcast), its activation checkpointing (full, non-reentrant)
          and chunked loss (no [tokens, vocab] fp32 logits)
  peft:   peft.prepare_model_for_kbit_training (PEFT's QLoRA recipe; it upcasts the
          non-quantised parameters to fp32) + get_peft_model(target_modules="all-linear"),
          HF gradient checkpointing (non-reentrant), bf16 autocast, in a plain loop
Memory counted: torch.cuda.max_memory_allocated from after quantisation to the end of the
timed steps (CPU: peak RSS, indicative only). Throughput: tokens of the timed steps / their time.
Prints one JSON line per arm and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256},
}


def build(shape: str, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import petkit as pk

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, use_cache=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never a full fp32 copy of the 8B base
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    pk.quantize(model, "nf4", compute_dtype=torch.bfloat16)
    return model


def attach(model: Any, arm: str, r: int) -> list:
    if arm == "petkit":
        import petkit as pk

        pk.attach(model, pk.LoraConfig(r=r, alpha=2 * r, targets="all-linear"))
        return list(pk.trainable_parameters(model).values())
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; the recipe keys on it
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    return [p for p in peft_model.parameters() if p.requires_grad]


def petkit_arm(model: Any, device: str, batch: int, seq: int, steps: int, warmup: int,
               r: int) -> tuple[list, float, float]:
    """pk.train over 2 x `steps` steps of fixed random sequences (the first `steps` warm up;
    tok/s is pk.train's rate over its last log window, the last `steps`); (params, tok/s, loss)."""
    import torch

    import petkit as pk

    params = attach(model, "petkit", r)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    data = [{"input_ids": row, "labels": row} for row in ids]
    config = pk.TrainConfig(lr=1e-4, max_steps=2 * steps, batch_size=batch, log_every=steps,
                            schedule="constant", device=device, precision="bf16" if device == "cuda" else "fp32",
                            activation_checkpointing="full", progress=False)
    result = pk.train(model, data, config)
    return params, result.tokens_per_s, result.history[-1]["train_loss"]


def run_arm(arm: str, shape: str, batch: int, seq: int, steps: int, warmup: int, r: int) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(shape, device)
    if arm == "petkit":
        params, tok_s, loss = petkit_arm(model, device, batch, seq, steps, warmup, r)
        return report(arm, shape, device, model, params, tok_s, loss)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = attach(model, arm, r)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return report(arm, shape, device, model, params, batch * seq * steps / seconds, float(loss))


def report(arm: str, shape: str, device: str, model: Any, params: list, tok_s: float,
           loss: float) -> dict[str, Any]:
    """One arm's JSON row: peak memory since the reset after quantisation, speed, fp32 count."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"arm": arm, "shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "trainable": sum(p.numel() for p in params), "peak_gib": round(peak, 2),
            "tokens_per_s": round(tok_s, 1), "loss": loss,
            "fp32_params": sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    parser.add_argument("--arms", default="petkit,peft")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "8b"
    if args.tiny:
        args.seq, args.steps, args.warmup = min(args.seq, 32), min(args.steps, 2), 1
    if args.arm:
        print(json.dumps(run_arm(args.arm, shape, args.batch, args.seq, args.steps, args.warmup, args.r)), flush=True)
        return
    rows = []
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--arm", arm, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--r", str(args.r)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "arm": arm, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("| arm | device | trainable | peak GiB | tokens/s | fp32 params |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['arm']} | {row.get('device', '')} | {row.get('trainable', '')} | {row.get('peak_gib', '')} | "
              f"{row.get('tokens_per_s', row.get('error', ''))} | {row.get('fp32_params', '')} |")


if __name__ == "__main__":
    main()
