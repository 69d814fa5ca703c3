"""How far fp8 saved activations move a LoRA gradient on a real model, on the CPU.

`--runtime.activation_quantization` keeps what the compiled blocks save for the backward pass
in fp8 (docs/training-gpu.md). The GPU benchmark (`gpu_train.py`, random weights) checks the loss
curve; random weights have none of a trained model's outlier channels, which one scale per
tensor rounds coarsely. This script takes SmolLM2-135M (embedded weights), real text (bbc-news
articles), LoRA r16 on all 7 linear layers with B drawn small (so every factor has a gradient),
blocks compiled with "elementwise" recompute, fp32, and compares one batch's gradients with and
without quantization: cosine similarity per factor, mean and lowest over the layers, split
into attention and MLP factors. The forward (the loss) is the same in every mode.

    OMP_NUM_THREADS=1 python benchmarks/fp8_grads.py --out docs/bench/fp8_grads.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

import petkit as pk
from petkit.cli_quantize import _texts
from petkit.models.loading import load_model
from petkit.training.activations import (activation_checkpointing, compiled_blocks,
                                         quantized_activations)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gradients(model: torch.nn.Module, ids: torch.Tensor, kind: str
              ) -> tuple[float, dict[str, torch.Tensor]]:
    """One batch's loss and LoRA gradients with saved activations kept as `kind`."""
    torch._dynamo.reset()
    model.zero_grad()
    with quantized_activations(kind, 0.0), activation_checkpointing(model, 1, "elementwise"), \
            compiled_blocks(model):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def similarity(exact: dict[str, torch.Tensor], rounded: dict[str, torch.Tensor]
               ) -> dict[str, dict[str, float]]:
    """Cosine similarity of each factor's gradient, grouped as attention / MLP x A / B."""
    groups: dict[str, list[float]] = {}
    for name, a in exact.items():
        b = rounded[name]
        group = ("attention" if ".self_attn." in name else "mlp") + "." + name.rsplit(".", 1)[1]
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        groups.setdefault(group, []).append(cos)
    return {g: {"mean": sum(v) / len(v), "min": min(v), "factors": len(v)}
            for g, v in sorted(groups.items())}


def main() -> None:
    """Parse, measure every mode against "none", print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["fp8", "fp8-mlp"])
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", task="causal-lm")
    model.train()
    model = pk.attach(model, pk.LoraConfig(r=16, targets=TARGETS))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    text = "\n\n".join(_texts("bbc-news")[0])
    need = args.batch * args.seq
    ids = tokenizer(text[: need * 8], return_tensors="pt").input_ids[:, :need]
    ids = ids.view(args.batch, args.seq)
    loss, exact = gradients(model, ids, "none")
    rows: dict[str, Any] = {"loss": loss, "batch": args.batch, "seq": args.seq, "modes": {}}
    for kind in args.modes:
        loss_q, rounded = gradients(model, ids, kind)
        rows["modes"][kind] = {"loss": loss_q, "cosine": similarity(exact, rounded)}
        print(f"{kind}: loss {loss_q:.6f} (none {loss:.6f})")
        for group, c in rows["modes"][kind]["cosine"].items():
            print(f"  {group:<18} cosine mean {c['mean']:.5f}  lowest {c['min']:.5f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
