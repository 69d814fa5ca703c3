"""What each LoRA initialisation costs at attach time, petkit beside PEFT's same init.

    nice -n 10 python benchmarks/lora_init_cost.py      # smollm2-135m, q/v, r=8; docs/lora_init_cost.json

Attach (petkit) / get_peft_model (PEFT) wall seconds on a copy of the model (2 threads); for the
data-driven inits petkit's `pk.initialize` on 4 batches of 4 x 32 tokens is added (PEFT's EVA /
CorDA / LoRA-GA preprocessing takes its own callbacks: not timed here). One run each.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QV = ["q_proj", "v_proj"]
INITS = ["default", "gaussian", "pissa", "pissa_niter_4", "olora", "eva", "corda", "lora-ga", "loftq"]
PEFT_SAME = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "pissa_niter_4": "pissa_niter_4",
             "olora": "olora"}


def main() -> None:
    import peft

    import petkit as pk
    from petkit.core.initialize import pending
    from petkit.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = load_model("smollm2-135m", dtype=torch.float32)[0]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 1000, (4, 32), generator=g)), "labels": ids} for _ in range(4)]
    rows = []
    for init in INITS:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        pk.attach(model, pk.LoraConfig(r=8, targets=QV, init=init))
        if pending(model):
            pk.initialize(model, batches)
        if init == "loftq":
            pk.loftq(model, "nf4")
        row = {"init": init, "petkit_s": round(time.perf_counter() - start, 3)}
        if init in PEFT_SAME:
            theirs = copy.deepcopy(base)
            start = time.perf_counter()
            peft.get_peft_model(theirs, peft.LoraConfig(r=8, target_modules=QV, init_lora_weights=PEFT_SAME[init]))
            row["peft_s"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    out = {"model": "smollm2-135m", "targets": QV, "r": 8, "threads": 2, "rows": rows}
    (ROOT / "docs" / "lora_init_cost.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
