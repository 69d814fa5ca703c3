"""One GRPO step on a GPU: petkit's GRPO objective through `pk.train` next to TRL's GRPOTrainer
with PEFT LoRA, in the same run, each case in its own process.

    python benchmarks/grpo_gpu.py --out grpo_gpu.json                    # 1.1B shape, cuda
    python benchmarks/grpo_gpu.py --smoke --device cpu                   # check the script

Protocol (the same for both): a random-weight Llama of TinyLlama-1.1B's shape (22 layers, hidden
2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000) in bf16; LoRA r16, alpha 32, no dropout, on
all 7 linear layers; a word-level tokenizer over the 32,000 ids ("w17 w923 ..."); 8 distinct
64-token prompts per step, 8 sampled completions each (64 rows, temperature 1, no top-k), at most
128 new tokens; reward: the share of even ids in the completion (a Python function on the
decoded text); KL weight 0.04 against the adapter-disabled model (no second copy: TRL does the
same with PEFT); the per-sequence-mean GRPO loss (TRL `loss_type="grpo"`), AdamW, no gradient
checkpointing, autocast bf16. TRL and PEFT versions are printed in the result.

A step's time is the wall time between the starts of consecutive optimiser steps (sampling,
rewards, policy and reference passes, backward, update), the median over the steps after the
first; peak is `torch.cuda.max_memory_allocated` from the second step's start to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22),
          "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)}
VOCAB, KL, LR = 32000, 0.04, 1e-5


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(shape: str, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], num_attention_heads=32 if shape == "1b" else 4,
                         num_key_value_heads=4 if shape == "1b" else 2, vocab_size=VOCAB,
                         max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def build_tokenizer() -> Any:
    """A word-level tokenizer whose ids are the model's: "<pad>" 0, "</s>" 1, "<unk>" 2, "wN" N."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def prompts(count: int, length: int = 64) -> list[str]:
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (count, length), generator=gen).tolist()
    return [" ".join(f"w{i}" for i in row) for row in ids]


def even_share(completions: list[str]) -> list[float]:
    """The reward: the share of even ids among a completion's words."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


class StepClock:
    """Start time of each optimiser step; resets the peak-memory counter at the second."""

    def __init__(self, device: str) -> None:
        self.device, self.stamps = device, []

    def tick(self) -> None:
        import torch

        sync(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 2 and self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def row(self) -> dict[str, Any]:
        import torch

        sync(self.device)
        self.stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        cuda = self.device.startswith("cuda")
        return {"step_s": statistics.median(gaps[1:-1] or gaps), "first_step_s": gaps[0],
                "steps_s": [round(g, 3) for g in gaps],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def petkit_case(args: argparse.Namespace) -> dict[str, Any]:
    import petkit as pk
    from petkit.training import TrainConfig
    from petkit.training.grpo import GRPOObjective, prompt_collate
    from petkit.training.grpo_rewards import Scorer
    from petkit.training.objectives_config import ObjectiveConfig

    model, tokenizer, clock = build_model(args.shape, args.device), build_tokenizer(), \
        StepClock(args.device)
    pk.attach(model, pk.LoraConfig(r=16, alpha=32, dropout=0.0, targets=TARGETS))
    texts = prompts(args.prompts * args.steps)
    rows = [{"prompt": t} for t in texts]
    data = [{"input_ids": tokenizer(t)["input_ids"], "labels": i} for i, t in enumerate(texts)]
    spec = ObjectiveConfig(name="grpo", rewards=["grpo_gpu:even_share"], group_size=args.group,
                           kl=KL, max_new_tokens=args.new_tokens, temperature=1.0)
    grpo = GRPOObjective(spec, tokenizer, rows,
                         [Scorer("grpo_gpu:even_share", lambda p, c, r: even_share(c))])

    class Timed:
        """The objective, with a clock tick at the start of each training call."""

        def __call__(self, model: Any, batch: Any) -> Any:
            if model.training:
                clock.tick()
            return grpo(model, batch)

        def log_fields(self) -> dict[str, float]:
            return grpo.log_fields()

    config = TrainConfig(lr=LR, max_steps=args.steps, batch_size=args.prompts, log_every=1,
                         device=args.device, precision="bf16", progress=False, objective=spec)
    result = pk.train(model, data, config, pad_id=0, collate_fn=lambda b: prompt_collate(b, 0),
                      objective=Timed())
    row = clock.row()
    row["reward_mean_last"] = result.history[-1].get("reward_mean")
    row["completion_tokens_last"] = result.history[-1].get("completion_tokens")
    return {"library": f"petkit {pk.__version__}", **row}


def trl_case(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import peft
    import trl
    from transformers import TrainerCallback

    model, tokenizer, clock = build_model(args.shape, args.device), build_tokenizer(), \
        StepClock(args.device)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.tick()

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return even_share(completions)

    cuda = args.device.startswith("cuda")
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0,
        top_k=0, beta=KL, loss_type="grpo", learning_rate=LR, max_steps=args.steps,
        logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
        bf16=cuda, use_cpu=not cuda, disable_dropout=True, seed=0, dataloader_num_workers=0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM")
    data = datasets.Dataset.from_dict({"prompt": prompts(args.prompts * args.steps)})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    row = clock.row()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    row["reward_mean_last"] = rewards[-1] if rewards else None
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    row["completion_tokens_last"] = lengths[-1] if lengths else None
    return {"library": f"trl {trl.__version__} + peft {peft.__version__}", **row}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Each case in a fresh process with a time limit; their rows and the ratios."""
    import torch

    out: dict[str, Any] = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name()
                           if args.device.startswith("cuda") else "cpu",
                           "shape": args.shape, "prompts": args.prompts, "group": args.group,
                           "new_tokens": args.new_tokens, "steps": args.steps}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parent),
         os.environ.get("PYTHONPATH", "")])}
    for case in args.cases:
        cmd = [sys.executable, __file__, "--worker", case, *sys.argv[1:]]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=env)
            lines = done.stdout.strip().splitlines()
            out[case] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
                {"error": done.stderr.strip()[-2000:]}
        except subprocess.TimeoutExpired:
            out[case] = {"error": f"timed out after {args.timeout} s"}
        print(case, json.dumps(out[case]), flush=True)
    if all("step_s" in out.get(c, {}) for c in ("petkit", "trl")):
        out["time_ratio_petkit_over_trl"] = out["petkit"]["step_s"] / out["trl"]["step_s"]
        if out["trl"]["peak_gib"]:
            out["memory_ratio_petkit_over_trl"] = out["petkit"]["peak_gib"] / out["trl"]["peak_gib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cases", nargs="+", default=["petkit", "trl"], choices=["petkit", "trl"])
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per case")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model, few tokens")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=["petkit", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.shape = "smoke" if args.smoke else "1b"
    if args.smoke:
        args.prompts, args.group, args.new_tokens, args.steps = 2, 2, 4, 3
    if args.worker:
        print(json.dumps({"petkit": petkit_case, "trl": trl_case}[args.worker](args)))
        return
    out = run_all(args)
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
