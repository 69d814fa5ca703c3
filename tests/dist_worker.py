"""One rank of a distributed test run (tests/test_distributed.py starts it with torchrun).

`python dist_worker.py '<json list of specs>'`: for each spec, trains LoRA on a tiny random
Llama with `pk.train` and writes `rank<r>.safetensors` (the full delta this rank ends with) and
`rank<r>.json` (the run's report and history) to spec["out"]. The same `build` / `data` serve the 1-process reference runs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.elastic.multiprocessing.errors import record

import petkit as pk
from petkit.models import tiny_model
from petkit.training.distributed import cleanup, full, init_from_env, rank


def data(n: int = 20, seed: int = 0) -> list[dict[str, list[int]]]:
    """Causal-LM examples of uneven lengths; the first tokens of some are prompt (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 13, (1,), generator=g))
        ids = torch.randint(3, 100, (length,), generator=g).tolist()
        prompt = i % 3
        out.append({"input_ids": ids, "attention_mask": [1] * length,
                    "labels": [-100] * prompt + ids[prompt:]})
    return out


def build(spec: dict[str, Any]) -> torch.nn.Module:
    """Tiny Llama (fp32, or a bf16 base with fp32 deltas) with LoRA r=4 on every linear layer."""
    model = tiny_model("llama", seed=0)[0]
    if spec.get("bf16_base"):
        model = model.to(torch.bfloat16)
    torch.manual_seed(0)
    pk.attach(model, pk.make_config("lora", r=4, alpha=8, targets="all-linear"))
    for p in pk.trainable_parameters(model).values():
        p.data = p.data.float()
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _inject_failure(model: torch.nn.Module, spec: dict[str, Any]) -> None:
    """On spec["fail_rank"], die (SIGKILL, or SIGABRT with "abort") or raise at its
    spec["fail_call"]-th forward."""
    if spec.get("fail_rank") != rank():
        return
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == spec["fail_call"]:
            print(f"failing at {time.time():.3f}", file=sys.stderr, flush=True)
            if spec.get("fail") == "raise":
                raise RuntimeError(f"injected failure on rank {rank()}")
            if spec.get("fail") == "abort":  # a native crash (SIGABRT)
                os.abort()
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(hook)


def run(spec: dict[str, Any]) -> None:
    """One training run as `spec` says; every rank writes what it ends with."""
    model = build(spec)
    _inject_failure(model, spec)
    result = pk.train(model, data(spec.get("n", 20)), pk.TrainConfig(**spec["train"]))
    tensors = full(dict(pk.trainable_parameters(model)))
    out, r = Path(spec["out"]), rank()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(out / f"rank{r}.safetensors"))
    (out / f"rank{r}.json").write_text(json.dumps({"report": result.report,
                                                   "history": result.history}))


@record
def main() -> None:
    """Run each spec of the JSON list in argv[1], in one process group."""
    init_from_env()
    for spec in json.loads(sys.argv[1]):
        run(spec)
    cleanup()


if __name__ == "__main__":
    main()
