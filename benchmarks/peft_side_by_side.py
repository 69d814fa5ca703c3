"""Each method PEFT also has, petkit's implementation beside PEFT's: trainable parameters and CPU
time per training step (forward + backward + AdamW) on the same model, batch and config.

    nice -n 10 python benchmarks/peft_side_by_side.py      # smollm2-135m, writes docs/peft_side_by_side.json
    nice -n 10 python benchmarks/peft_side_by_side.py 3 lily,ia3   # re-run some rows, keep the others

One process, both arms of a method timed alternately (petkit, PEFT, petkit, PEFT, ...) after one
warm-up step each (process CPU time, median of `steps`), so that load on the machine hits both alike; the ratio is petkit / PEFT
(< 1: petkit faster). Adapters start from each library's own init, then train on the same batch.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QV = ["q_proj", "v_proj"]
# (petkit method, petkit config fields, PEFT config class name, PEFT config fields)
ARMS = [
    ("lora", {"r": 8, "alpha": 16.0}, "LoraConfig", {"r": 8, "lora_alpha": 16}),
    ("vera", {"r": 256}, "VeraConfig", {"r": 256}),
    ("loha", {"r": 8, "alpha": 8.0}, "LoHaConfig", {"r": 8, "alpha": 8}),
    ("lokr", {"r": 8, "alpha": 8.0}, "LoKrConfig", {"r": 8, "alpha": 8}),
    ("oft", {"block_size": 32}, "OFTConfig", {"r": 0, "oft_block_size": 32}),
    ("hra", {"r": 8}, "HRAConfig", {"r": 8}),
    ("hira", {"r": 8}, "HiraConfig", {"r": 8}),
    ("shira", {"r": 32}, "ShiraConfig", {"r": 32}),
    ("adalora", {"init_r": 12, "target_r": 8}, "AdaLoraConfig", {"init_r": 12, "target_r": 8, "total_step": 100}),
    ("lily", {"r": 32, "stride_A": 1, "num_B": 2}, "LilyConfig", {"r": 32, "stride_A": 1, "num_B": 2}),
    ("ia3", {"feedforward_targets": []}, "IA3Config", {"feedforward_modules": []}),
]


def step_time(model: torch.nn.Module, batch: dict, steps: int) -> list[float]:
    """CPU seconds of each of `steps` training steps (a fresh AdamW: its first step costs alike)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(max(steps, 1)):
        start = time.process_time()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    return times[:steps]


def main(steps: int = 3, only: list[str] | None = None) -> None:
    import peft

    import petkit as pk
    from petkit.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 unless set
    base = load_model("smollm2-135m", dtype=torch.float32)[0].train()
    batch = {"input_ids": torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))}
    out = {"model": "smollm2-135m", "batch": "4 x 32 tokens", "steps": steps,
           "threads": torch.get_num_threads(), "rows": []}
    saved = ROOT / "docs" / "peft_side_by_side.json"
    kept = {r["method"]: r for r in json.loads(saved.read_text())["rows"]} if only and saved.is_file() else {}
    for method, ours_cfg, peft_name, peft_cfg in ARMS:
        if only and method not in only:
            if method in kept:
                out["rows"].append(kept[method])
            continue
        ours = pk.attach(copy.deepcopy(base), pk.make_config(method, targets=QV, **ours_cfg))
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, peft_name)(target_modules=QV, **peft_cfg))
        n_ours = sum(p.numel() for p in pk.trainable_parameters(ours).values())
        n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
        step_time(ours, batch, 0), step_time(theirs, batch, 0)  # warm-up (first-call costs)
        t_ours, t_theirs = [], []
        for _ in range(steps):
            t_ours += step_time(ours, batch, 1)
            t_theirs += step_time(theirs, batch, 1)
        row = {"method": method, "peft": peft_name, "trainable": n_ours, "peft_trainable": n_theirs,
               "cpu_s_step": statistics.median(t_ours), "peft_cpu_s_step": statistics.median(t_theirs)}
        row["ratio"] = row["cpu_s_step"] / row["peft_cpu_s_step"]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del ours, theirs
    (ROOT / "docs" / "peft_side_by_side.json").write_text(json.dumps(out, indent=2) + "\n")
    print(render(out))


def render(out: dict) -> str:
    """The docs/methods.md table of a run."""
    lines = ["| method | PEFT class | trainable (petkit) | trainable (PEFT) | CPU s/step petkit | CPU s/step PEFT "
             "| petkit / PEFT |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["rows"]:
        lines.append(f"| {r['method']} | {r['peft']} | {r['trainable']:,} | {r['peft_trainable']:,} | "
                     f"{r['cpu_s_step']:.2f} | {r['peft_cpu_s_step']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, sys.argv[2].split(",") if len(sys.argv) > 2 else None)
