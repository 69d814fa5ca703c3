"""CPU time per training step of a method, petkit against PEFT's twin (the harness's PEFT config),
on MiniLM-L6 with a 5-way head, batch 16 x 64 tokens, one torch thread: both arms in one
process, one warm-up step each, then `steps` steps alternating petkit, PEFT, ... (median of each).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/peft_step_time.py shira,ln-tuning 8
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """Process CPU seconds of one forward + backward + AdamW step."""
    start = time.process_time()
    model(**batch)[0].float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - start


def main(methods: list[str], steps: int) -> None:
    import peft

    import petkit as pk
    from petkit.benchmark.arms import peft_config
    from petkit.models import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = load_model("minilm-l6", task="seq-cls", num_labels=5)[0].train()
    batch = {"input_ids": torch.randint(1000, 5000, (16, 64), generator=torch.Generator().manual_seed(0))}
    for method in methods:
        config = pk.make_config(method)
        arms = [pk.attach(copy.deepcopy(base), config),
                peft.get_peft_model(copy.deepcopy(base), peft_config(method, config, base, "head"))]
        optims = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for m in arms]
        times: list[list[float]] = [[], []]
        for i in (0, 1):
            step(arms[i], optims[i], batch)  # warm-up
        for _ in range(steps):
            for i in (0, 1):
                times[i].append(step(arms[i], optims[i], batch))
        ours, theirs = (statistics.median(t) for t in times)
        print(f"{method}: petkit {ours:.3f} s, PEFT {theirs:.3f} s, petkit / PEFT {ours / theirs:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
