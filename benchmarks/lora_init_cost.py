"""What each LoRA initialisation costs at attach time, petkit beside PEFT's same init.

    nice -n 10 python benchmarks/lora_init_cost.py      # smollm2-135m, q/v, r=8; docs/lora_init_cost.json
    python benchmarks/lora_init_cost.py --inits default corda lora-ga loftq --threads 1   # some rows

The file is written after every row; rows of inits not run keep their earlier values (each row
records its threads and when it ran).

Attach (petkit) / get_peft_model (PEFT) wall seconds on a copy of the model (2 threads); for the
data-driven inits petkit's `pk.initialize` on 4 batches of 4 x 32 tokens is added, and PEFT's
preprocessing on the same batches (`preprocess_corda` in its "ipm" mode, `preprocess_loraga`,
`initialize_lora_eva_weights`; LoftQ 4-bit, one iteration, in `get_peft_model`). One run each.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QV = ["q_proj", "v_proj"]
INITS = ["default", "gaussian", "pissa", "pissa_niter_4", "olora", "eva", "corda", "lora-ga", "loftq"]
PEFT_SAME = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "pissa_niter_4": "pissa_niter_4",
             "olora": "olora", "eva": "eva", "corda": "corda", "lora-ga": "lora_ga", "loftq": "loftq"}


def peft_attach(peft, model, init: str, batches: list[dict]) -> None:
    """PEFT's get_peft_model with `init`, preceded / followed by its own data pass where it has one."""
    from peft.tuners.lora.config import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.eva import initialize_lora_eva_weights
    from peft.tuners.lora.loraga import preprocess_loraga

    extra = {"corda": {"corda_config": CordaConfig(corda_method="ipm")},
             "lora-ga": {"lora_ga_config": LoraGAConfig()},
             "eva": {"eva_config": EvaConfig()},
             "loftq": {"loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=1)}}.get(init, {})
    config = peft.LoraConfig(r=8, target_modules=QV, init_lora_weights=PEFT_SAME[init], **extra)
    if init == "corda":
        rows = [row[None] for b in batches for row in b["input_ids"]]  # its hook takes batch 1
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=row) for row in rows])
    if init == "lora-ga":
        preprocess_loraga(model, config, train_step=lambda: [model(**b).loss.backward() for b in batches])
    wrapped = peft.get_peft_model(model, config)
    if init == "eva":
        initialize_lora_eva_weights(wrapped, dataloader=batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--inits", nargs="+", choices=INITS, default=INITS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import peft

    import petkit as pk
    from petkit.core.initialize import pending
    from petkit.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = ROOT / "docs" / "lora_init_cost.json"
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    base = load_model("smollm2-135m", dtype=torch.float32)[0]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 1000, (4, 32), generator=g)), "labels": ids} for _ in range(4)]
    rows = {row["init"]: row for row in kept}
    for init in args.inits:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        pk.attach(model, pk.LoraConfig(r=8, targets=QV, init=init))
        if init == "loftq":
            pk.loftq(model, "nf4")
        elif pending(model):
            pk.initialize(model, batches)
        row = {"init": init, "petkit_s": round(time.perf_counter() - start, 3),
               "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if init in PEFT_SAME:
            theirs = copy.deepcopy(base)
            start = time.perf_counter()
            try:
                peft_attach(peft, theirs, init, batches)
                row["peft_s"] = round(time.perf_counter() - start, 3)
            except Exception as exc:  # noqa: BLE001  (a row that says why PEFT could not)
                row["peft_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows[init] = row
        print(json.dumps(row), flush=True)
        del model
        out = {"model": "smollm2-135m", "targets": QV, "r": 8,
               "rows": [rows[i] for i in INITS if i in rows]}
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
