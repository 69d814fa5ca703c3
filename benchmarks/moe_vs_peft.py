"""LoRA on MoE experts (`target_parameters`), petkit beside PEFT: trainable parameters and CPU time
per training step (forward + backward + AdamW) on the same random Mixtral, batch and config.

    nice -n 10 python benchmarks/moe_vs_peft.py [steps]     # writes docs/moe_vs_peft.json

A random Mixtral (4 layers, hidden 256, 8 experts of width 512, 2 per token, vocab 1000; no
download), LoRA r 8 on every expert's `gate_up_proj` and `down_proj`, batch 4 x 64 tokens, 2 torch
threads; both arms in one process, timed alternately after one warm-up step each (process CPU time,
median of `steps`); the ratio is petkit / PEFT (< 1: petkit faster).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_side_by_side import step_time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def main(steps: int = 5) -> None:
    import peft
    from transformers import MixtralConfig, MixtralForCausalLM

    import petkit as pk

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=256)
    base = MixtralForCausalLM(config).train()
    batch = {"input_ids": torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))}
    ours = pk.attach(copy.deepcopy(base), pk.LoraConfig(r=8, alpha=16.0, target_parameters=PARAMS))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=[],
                                                                        target_parameters=PARAMS))
    step_time(ours, batch, 0), step_time(theirs, batch, 0)  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(steps):
        t_ours += step_time(ours, batch, 1)
        t_theirs += step_time(theirs, batch, 1)
    row = {"trainable": sum(p.numel() for p in pk.trainable_parameters(ours).values()),
           "peft_trainable": sum(p.numel() for p in theirs.parameters() if p.requires_grad),
           "cpu_s_step": statistics.median(t_ours), "peft_cpu_s_step": statistics.median(t_theirs)}
    row["ratio"] = row["cpu_s_step"] / row["peft_cpu_s_step"]
    out = {"model": "random Mixtral 4 x 256, 8 experts (512), top-2", "batch": "4 x 64 tokens", "steps": steps,
           "threads": 2, **row}
    (ROOT / "docs" / "moe_vs_peft.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
