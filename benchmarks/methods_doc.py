"""Markdown for docs/methods.md from the cells that `methods_table.py` cached."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DYLORA_JSON = Path(__file__).resolve().parents[1] / "docs" / "dylora_ranks.json"

HEADER = """# Methods

Every registered method (`petkit methods` lists them with their papers) trained on two small,
embedded settings with `petkit.training` — the same path as `petkit train --method NAME`. This file
is generated; regenerate it (and its cache `docs/methods_table.json`) with one command:

    python benchmarks/methods_table.py

`--only METHOD[,METHOD]` re-runs some methods' cells; cached cells are reused, so an interrupted
run resumes. New methods appear automatically (they are read from the registry).

Any method whose delta sits inside the transformer blocks can also be trained with IST
(importance-aware sparse tuning, `petkit train --method lora --ist-top-k 4 --ist-every 10`):
only k importance-sampled layers' deltas update at each step; the chosen layers are logged as
`ist_layers` in `metrics.jsonl` and counted per layer in the run's summary.

Protocol: a seeded subset of the training split ({sizes}), {epochs} epochs, batch {batch_size},
AdamW with linear decay after {warmup}% warm-up, the learning rate in the table, max length
{max_length} tokens, seed {seed}; test accuracy on a fixed subset of {test_size} test examples;
no validation split and no tuning (one run: read the accuracy as "it learns", not as a ranking).
Soft prompts (`prompt`, `residual-prompt`, `prefix-propagation`) start from the embeddings of a
sentence naming the task (Lester et al.'s text initialisation: `init="text"`, `init_text_ids`;
the residual prompt's branch starts at 0, `branch_init="zero"`, so its prompt starts there too);
the learning rate is per method (prompt-style deltas and the prefixes need larger steps, and at
3e-3 the encoder's new head barely moves in 32 steps).
Each cell runs in its own process with {threads} torch threads on the CPU. *Trainable* counts
the active delta (for the encoder also the new classification head, trained in full);
*% of base* divides by the base model's parameter count. *Peak RSS* is the cell process's peak
resident memory (model, data and training). *CPU s/step* is the process's CPU time per optimiser
step (OpenMP threads wait passively, so it counts work, but a shared, oversubscribed machine
still inflates it through cache and memory contention); *wall s/step* is elapsed time per step
as measured, which depends on that load. Compare methods within one table, not across runs.
"""


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "—"


def _row(method: str, family: str, cell: dict[str, Any] | None, untuned: float | None) -> str:
    if cell is None:
        return f"| {method} | {family} | not run yet | | | | | | | |"
    if "accuracy" not in cell:
        return f"| {method} | {family} | skipped: {cell.get('note', '?')} | | | | | | | |"
    trainable = cell.get("trainable", 0)
    pct = 100.0 * trainable / cell["base_params"]
    steps = (f"{cell['cpu_s_per_step']:.2f} | {cell['wall_s_per_step']:.2f}"
             if "cpu_s_per_step" in cell else "— | —")
    lr = f"{cell['lr']:g}" if "lr" in cell else "—"
    gain = "—" if untuned is None or "trainable" not in cell else f"{100 * (cell['accuracy'] - untuned):+.1f}"
    return (f"| {method} | {family} | {_fmt_int(trainable)} | {pct:.3f}% | "
            f"{100 * cell['accuracy']:.1f} | {gain} | {cell['peak_mb']:.0f} | {steps} | {lr} |")


def _dylora_section() -> list[str]:
    """Accuracy against rank from one DyLoRA run per setting (benchmarks/dylora_ranks.py)."""
    if not DYLORA_JSON.is_file():
        return []
    out = ["## DyLoRA: accuracy against rank from one training run\n",
           "One DyLoRA adapter per setting is trained over ranks 1..8 (a rank drawn per step, "
           "the recipe's other settings unchanged: `default` and `minilm-bbc`), saved once, then "
           "tested truncated to each rank, without retraining. Regenerate with "
           "`python benchmarks/dylora_ranks.py` (~10 min on 2 cores); the CLI does the same for one "
           "run: `petkit train --method dylora --dylora-eval-ranks 1,2,4,8`, and `petkit eval "
           "--adapter A --rank 2` tests a saved adapter at rank 2.\n",
           dylora_table(json.loads(DYLORA_JSON.read_text())),
           "", "![DyLoRA accuracy against rank](dylora-ranks.png)", ""]
    return out


def dylora_table(results: dict[str, Any]) -> str:
    """Markdown: per setting, untuned accuracy, accuracy at each rank, training steps."""
    ranks = sorted({int(r) for res in results.values() for r in res["by_rank"]})
    rows = ["| setting | untuned | " + " | ".join(f"r={r}" for r in ranks) + " | steps |",
            "| --- | ---: | " + " | ".join("---:" for _ in ranks) + " | ---: |"]
    for name, res in results.items():
        cells = " | ".join(f"{100 * res['by_rank'][str(r)]:.1f}" for r in ranks)
        rows.append(f"| {res.get('label', name)} | {100 * res['untuned']:.1f} | {cells} | {res['steps']} |")
    return "\n".join(rows)


def render(cache: dict[str, Any], methods: list[tuple[str, str]], settings: dict[str, dict[str, str]],
           protocol: dict[str, Any], baseline: str) -> str:
    """The whole document: header, then one table per setting."""
    sizes = ", ".join(f"{spec['train_size']} for the {name}" for name, spec in settings.items())
    out = [HEADER.format(warmup=int(100 * protocol["warmup_ratio"]), sizes=sizes, **protocol)]
    for setting, spec in settings.items():
        out.append(f"## {spec['data']} · {spec['model']} ({spec['task_type']}, {setting})\n")
        out.append("| method | family | trainable | % of base | test acc (%) | vs untuned (points) "
                   "| peak RSS (MiB) | CPU s/step | wall s/step | lr |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        base_cell = cache["cells"].get(f"{setting}/{baseline}") or {}
        untuned = base_cell.get("accuracy")
        out.append(_row(baseline, "(no delta)", base_cell or None, untuned))
        for method, family in methods:
            out.append(_row(method, family, cache["cells"].get(f"{setting}/{method}"), untuned))
        out.append("")
    cpu = sum(c.get("cpu_seconds", 0.0) for c in cache["cells"].values())
    wall = sum(c.get("seconds", 0.0) for c in cache["cells"].values())
    out.append(f"Cost of these cells: {cpu / 60:.0f} CPU-minutes (about {cpu / 120:.0f} minutes on 2 idle "
               f"cores); measured wall time {wall / 60:.0f} minutes on the machine as it was loaded.\n")
    out += _dylora_section()
    return "\n".join(out)
