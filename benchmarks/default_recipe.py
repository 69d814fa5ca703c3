"""The search behind `petkit train`'s default recipe (docs/default-recipe.md): candidate recipes
trained on a training subset and scored on a validation split (the harness's own data, arms and
training loop; the sealed test subset is never opened), then a table.

Where the grid carves validation from the training subset (`validation: {fraction: 0.2, ...}`,
the first search) the cell trains on the rest. With `validation: {fraction: 0}` (the held-out
search) the cell trains on all `size` examples, exactly as the test grid does, and is scored on
the HELD_OUT training-pool examples that follow them in the seed's order (never among them), or
on `validation.max` of them where the grid sets it (round 4: 1,200).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/default_recipe.py search benchmarks/default_recipe_heldout.yaml
    ... search benchmarks/default_recipe_heldout_r4.yaml 1/1 rotten-tomatoes [ARM,ARM]   # one task, some arms
    ... search benchmarks/default_recipe_heldout_r5.yaml 1/1 bbc-news ARM 1               # and one seed
    python benchmarks/default_recipe.py table           # search tables + the test grid's table
    ... cost benchmarks/default_recipe_heldout_r10.yaml rotten-tomatoes 20   # CPU s/step only

`cost` trains each arm of the grid for a few steps on seed 0's training examples only (no
validation or test example is read, nothing is scored) and prints its CPU s/step against the
grid's first arm, measured in the same process: what a rule about CPU time needs before any of
its cells run.

The test comparison (winner, today's default, PEFT's default LoRA; 3 seeds; test split) is a
plain harness grid: `petkit bench benchmarks/default_recipe_test.yaml --output runs/bench-default-test`.
Results of a search go to docs/<grid file's stem>.jsonl (one line per cell; re-running skips
cells already there, so an interrupted search resumes).
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from petkit.benchmark.arms import ArmContext, make_arm
from petkit.benchmark.spec import Cell, load_spec
from petkit.benchmark.tasks import CellData, cell_data, load
from petkit.training import train

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = {"validation carved from the 480 (96 examples)": ROOT / "docs" / "default_recipe_search.jsonl",
            "held-out validation (400 examples outside the 480)": ROOT / "docs" / "default_recipe_heldout.jsonl",
            "held-out validation, seed 1 (400 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_seed1.jsonl",
            "held-out validation, round 4 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r4.jsonl",
            "held-out validation, round 4, seed 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r4_seed1.jsonl",
            "held-out validation, round 5, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r5.jsonl",
            "held-out validation, round 6, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r6.jsonl",
            "held-out validation, round 7, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r7.jsonl",
            "held-out validation, round 8, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r8.jsonl",
            "held-out validation, round 9, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r9.jsonl",
            "held-out validation, round 10, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r10.jsonl",
            "held-out validation, round 11, seeds 0 and 1 (1,200 examples outside the 480)":
                ROOT / "docs" / "default_recipe_heldout_r11.jsonl",
            **{f"held-out validation, full fine-tuning at lr {lr}, seeds 0 and 1 (1,200 examples outside the 480)":
               ROOT / "docs" / f"default_recipe_ceiling_lr{lr}.jsonl" for lr in ("1e-5", "3e-5", "1e-4")}}
HELD_OUT = 400  # validation examples after the cell's training examples (grids with fraction 0, no max)
# test grids: their run folder's cells.csv, else the copy kept in docs/ (the runs of 2026-12-07)
TESTS = {ROOT / "runs" / "bench-default-test": ROOT / "docs" / "default_recipe_test.csv",
         ROOT / "runs" / "bench-default-test-candidate": ROOT / "docs" / "default_recipe_test_candidate.csv",
         ROOT / "runs" / "bench-default-test-candidate2": ROOT / "docs" / "default_recipe_test_candidate2.csv",
         ROOT / "runs" / "bench-default-test-candidate3": ROOT / "docs" / "default_recipe_test_candidate3.csv",
         ROOT / "runs" / "bench-default-test-candidate4": ROOT / "docs" / "default_recipe_test_candidate4.csv",
         ROOT / "runs" / "bench-default-test-candidate5": ROOT / "docs" / "default_recipe_test_candidate5.csv"}


def search_data(loaded, size: int, seed: int, fraction: float, maximum: int | None) -> CellData:
    """Carved from the `size` examples (fraction > 0), or all of them for training and the
    `maximum` (HELD_OUT where None) pool examples after them in the seed's order for validation
    (fraction 0)."""
    if fraction > 0:
        return cell_data(loaded, size, seed, fraction, maximum)
    both = cell_data(loaded, size + (maximum or HELD_OUT), seed, 0, None).train  # nested: train first
    return CellData(both[:size], both[size:])


def _arm_model(cell: Cell, spec, loaded):
    """The cell's TrainConfig (no evaluation inside), its arm's fresh model and trained parameters."""
    config = spec.train_config(cell).replace(label_token_ids=loaded.label_token_ids, eval_every=0)
    arm = make_arm(cell.arm)
    model = arm.setup(loaded.fresh_model(cell.seed), ArmContext(loaded.task_type, loaded.head_modules, cell.seed))
    return config, model, arm.parameters(model)


def validation_cell(cell: Cell, spec, loaded) -> dict:
    """Train one cell; its accuracy on the validation split at the last step (no test)."""
    data = search_data(loaded, cell.size, cell.seed, spec.validation_fraction, spec.validation_max)
    config, model, params = _arm_model(cell, spec, loaded)
    cpu, wall = time.process_time(), time.perf_counter()
    result = train(model, data.train, config, eval_data=data.validation, pad_id=loaded.pad_id,
                   parameters=params, collate_fn=loaded.collate)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"key": cell.key, "task": cell.task.name, "arm": cell.arm.name, "seed": cell.seed,
            "val_accuracy": result.best_metric, "n_train": len(data.train), "n_val": len(data.validation),
            "steps": result.steps, "trainable": sum(p.numel() for p in params.values()),
            "cpu_s_per_step": cpu / max(result.steps, 1), "wall_s_per_step": wall / max(result.steps, 1)}


def search(path: str, shard: str = "1/1", task: str = "", only: str = "", seed: str = "") -> None:
    """Run this shard's cells of the search grid that are not in its jsonl (docs/) yet; only
    `task`'s, only those of the comma-separated arms `only` and only `seed`'s where given."""
    spec = load_spec(path)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    index, count = (int(x) for x in shard.split("/"))
    out = ROOT / "docs" / f"{Path(path).stem}.jsonl"
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.exists() else set()
    loaded = {}
    arms = [a.name for a in spec.arms]  # arm by arm, both tasks each: a search cut short compares alike
    cells = sorted(spec.cells(), key=lambda c: (c.seed, arms.index(c.arm.name)))
    for cell in cells[index - 1::count]:
        if cell.key in done or (task and cell.task.name != task) or (only and cell.arm.name not in only.split(",")) \
                or (seed and cell.seed != int(seed)):
            continue
        if cell.task.name not in loaded:
            loaded[cell.task.name] = load(cell.task)
        try:
            record = validation_cell(cell, spec, loaded[cell.task.name])
        except Exception as error:  # one broken arm must not stop the others: reported, not recorded
            print(f"{cell.key}: failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        print(json.dumps(record), flush=True)
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def cost(path: str, task: str, steps: str = "20") -> None:
    """CPU s/step of each arm over `steps` training steps of `task` (seed 0's training examples;
    the first step, which warms caches up, not counted), and its ratio to the first arm's."""
    spec = load_spec(path)
    torch.set_num_threads(spec.threads or 1)
    cells = [c for c in spec.cells() if c.task.name == task and c.seed == spec.seeds[0]]
    loaded, first = load(cells[0].task), None
    for cell in cells:
        data = cell_data(loaded, cell.size, cell.seed, 0, None)  # the test grid's training examples, nothing else
        config, model, params = _arm_model(cell, spec, loaded)
        train(model, data.train, config.replace(max_steps=1), pad_id=loaded.pad_id, parameters=params,
              collate_fn=loaded.collate)  # warm-up step, not counted
        start = time.process_time()
        train(model, data.train, config.replace(max_steps=int(steps)), pad_id=loaded.pad_id,
              parameters=params, collate_fn=loaded.collate)
        per_step = (time.process_time() - start) / int(steps)
        first = per_step if first is None else first
        print(f"{task} {cell.arm.name}: batch {config.batch_size}, {sum(p.numel() for p in params.values()):,} "
              f"trainable, CPU {per_step:.2f} s/step, x{per_step / first:.2f} the first arm's", flush=True)


def _rows(records: list[dict], value: str) -> dict[tuple[str, str], list[float]]:
    table: dict[tuple[str, str], list[float]] = {}
    for r in records:
        table.setdefault((r["arm"], r["task"]), []).append(float(r[value]))
    return table


def _markdown(records: list[dict], value: str, step: str, scale: float) -> str:
    """arm x task table: mean `value` (x scale) and mean `step` time per task, seeds counted."""
    tasks = sorted({r["task"] for r in records})
    arms = list(dict.fromkeys(r["arm"] for r in records))
    values, steps = _rows(records, value), _rows(records, step)
    head = " | ".join(f"{t} | {t} s/step" for t in tasks)
    lines = [f"| arm | {head} | seeds |", "| --- |" + " ---: |" * (2 * len(tasks) + 1)]
    for arm in arms:
        cells = [f"{scale * statistics.mean(values[arm, t]):.1f} | {statistics.mean(steps[arm, t]):.2f}"
                 if (arm, t) in values else "not measured | —" for t in tasks]
        n = min(len(values.get((arm, t), [])) for t in tasks)
        lines.append(f"| {arm} | {' | '.join(cells)} | {n} |")
    return "\n".join(lines)


def _per_seed(rows: list[dict]) -> str:
    """arm x task table of the test accuracy (%) of each seed, in seed order."""
    tasks = sorted({r["task"] for r in rows})
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    seeds = {(r["arm"], r["task"], int(r["seed"])): 100 * float(r["test_metric"]) for r in rows}
    lines = [f"| arm | {' | '.join(tasks)} |", "| --- |" + " --- |" * len(tasks)]
    for arm in arms:
        cells = [" / ".join(f"{v:.1f}" for (a, t, _), v in sorted(seeds.items(), key=lambda i: i[0][2])
                            if (a, t) == (arm, task)) or "not measured" for task in tasks]
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _against(rows: list[dict], reference: str, skip: tuple[str, ...] = ()) -> str:
    """Each other arm against `reference`, per task: mean test points above it, CPU time ratio."""
    values, cpu = _rows(rows, "test_metric"), _rows(rows, "cpu_s_per_step")
    lines = []
    for arm, task in values:
        if arm != reference and arm not in skip and (reference, task) in values:
            gap = 100 * (statistics.mean(values[arm, task]) - statistics.mean(values[reference, task]))
            ratio = statistics.mean(cpu[arm, task]) / statistics.mean(cpu[reference, task])
            lines.append(f"{arm} - {reference} on {task}: {gap:+.1f} points, CPU s/step x{ratio:.2f} "
                         f"({len(values[arm, task])} and {len(values[reference, task])} seeds)")
    return "\n".join(lines)


def test_rows() -> list[dict]:
    """The finished cells of every test grid (today's default and PEFT's, then the candidate)."""
    rows = []
    for run, copy in TESTS.items():
        results = run / "cells.csv" if (run / "cells.csv").exists() else copy
        if results.exists():
            with results.open(encoding="utf-8") as handle:
                rows += [r for r in csv.DictReader(handle) if r.get("status", "ok") == "ok" and r["test_metric"]]
    return rows


def table() -> None:
    """Print the search's validation table and, where it ran, the test grid's table."""
    for name, path in SEARCHES.items():
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines()]
            print(f"{name}: validation accuracy (%), CPU s/step:\n"
                  + _markdown(records, "val_accuracy", "cpu_s_per_step", 100) + "\n")
    rows = test_rows()
    if rows:
        print("\ntest accuracy (%), CPU s/step:\n" + _markdown(rows, "test_metric", "cpu_s_per_step", 100))
        print("\ntest accuracy (%), wall s/step:\n" + _markdown(rows, "test_metric", "s_per_step", 100))
        print("\ntest accuracy (%) per seed (seeds 0 / 1 / 2):\n" + _per_seed(rows))
        print("\n" + _against(rows, "peft-default"))
        print(_against(rows, "default-qv-r8", skip=("peft-default",)))


if __name__ == "__main__":
    if sys.argv[1] == "search":
        search(*sys.argv[2:])
    elif sys.argv[1] == "cost":
        cost(*sys.argv[2:])
    else:
        table()
