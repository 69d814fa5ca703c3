"""Diagnostics for the default recipe's search (docs/default-recipe.md, round 4): what limits
rotten-tomatoes? Nothing here opens a test split.

    python benchmarks/default_recipe_diag.py truncation    # tokenizer only: how many examples max length 64 cuts
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/default_recipe_diag.py curve rotten-tomatoes 60 10
        # today's default, seed 0: held-out validation accuracy (the 400 examples after the 480)
        # before training and every 10 steps of a 60-step run (120: the same with twice the steps)

`curve` appends one line per run to docs/default_recipe_diag.jsonl.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from petkit.benchmark.arms import ArmContext, make_arm
from petkit.benchmark.spec import load_spec
from petkit.benchmark.tasks import _chosen, load
from petkit.data.encode import _ids
from petkit.training import train
from petkit.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "default_recipe_heldout.yaml"  # today's default arm, tasks and budget
OUT = ROOT / "docs" / "default_recipe_diag.jsonl"
sys.path.insert(0, str(ROOT / "benchmarks"))
from default_recipe import search_data  # noqa: E402  (the held-out split of the search)


def truncation() -> None:
    """Per task: of the 480 training examples of seeds 0-2 (and of the whole pool), how many the
    template plus text would make longer than max_length; the text's end is what is cut."""
    spec = load_spec(str(GRID))
    for task in spec.tasks:
        loaded = load(task)
        tok, limit = loaded.tokenizer, task.max_length
        def length(example: dict) -> int:
            return len(_ids(tok, loaded.template.replace("{text}", example["text"]), True))
        pool = [length(e) for e in loaded.pool]
        cut = sum(n > limit for n in pool)
        print(f"{task.name}: template {loaded.template!r}, max_length {limit}; whole pool "
              f"{cut} of {len(pool)} cut ({100 * cut / len(pool):.1f}%), tokens median "
              f"{statistics.median(pool):.0f}, 90th pct {sorted(pool)[int(0.9 * len(pool))]}, max {max(pool)}")
        for seed in (0, 1, 2):
            lengths = [length(e) for e in _chosen(loaded, 480, seed, False)]
            over = [n for n in lengths if n > limit]
            lost = sum(n - limit for n in over)
            print(f"  seed {seed} training 480: {len(over)} cut ({100 * len(over) / 480:.1f}%), "
                  f"{lost} of {sum(lengths)} tokens lost ({100 * lost / sum(lengths):.1f}%); "
                  f"{sum(n > 96 for n in lengths)} longer than 96, {sum(n > 128 for n in lengths)} than 128")


def curve(task_name: str, steps: int, every: int) -> None:
    """Today's default (seed 0) on `task_name` for `steps` steps (schedule over those steps),
    held-out validation accuracy at step 0 and every `every` steps."""
    spec = load_spec(str(GRID))
    torch.set_num_threads(spec.threads or 1)
    cell = next(c for c in spec.cells() if c.task.name == task_name and c.arm.name == "default-qv-r8")
    loaded = load(cell.task)
    data = search_data(loaded, cell.size, cell.seed, 0, None)
    config = spec.train_config(cell).replace(label_token_ids=loaded.label_token_ids, eval_every=every,
                                             max_steps=steps)
    arm = make_arm(cell.arm)
    model = arm.setup(loaded.fresh_model(cell.seed), ArmContext(loaded.task_type, loaded.head_modules, cell.seed))
    params = arm.parameters(model)
    start = evaluate(model, data.validation, batch_size=config.eval_batch_size or 32, pad_id=loaded.pad_id,
                     label_token_ids=loaded.label_token_ids)
    wall = time.perf_counter()
    result = train(model, data.train, config, eval_data=data.validation, pad_id=loaded.pad_id, parameters=params)
    rows = [{"step": 0, "accuracy": start["accuracy"], "loss": start["loss"]}] + [
        {"step": r["step"], "accuracy": r["eval_accuracy"], "loss": r["eval_loss"]}
        for r in result.history if "eval_accuracy" in r]
    record = {"task": task_name, "arm": cell.arm.name, "seed": cell.seed, "steps": steps, "every": every,
              "n_train": len(data.train), "n_val": len(data.validation), "curve": rows,
              "wall_s": time.perf_counter() - wall}
    print(json.dumps(record), flush=True)
    with OUT.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "truncation":
        truncation()
    else:
        curve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
