"""Quality of gradient-free tuning on rotten-tomatoes with smollm2-135m (CPU): test accuracy of
the untuned model, backprop LoRA, MeZO over LoRA and MeZO over prompt tuning, same data split.

Every run uses petkit's recipe pipeline (verbaliser classification, validation split from the
training subset for best-step selection, the fixed 300-example test subset never used for
selection) and reports the steps it ran, the step the validation picked, and its CPU time.

    python benchmarks/zo_quality.py                      # all runs below
    python benchmarks/zo_quality.py --runs mezo-lora --set mezo-lora:train.lr=2e-4
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

COMMON = {"data.train_size": "1000", "data.validation_size": "100", "data.test_size": "300",
          "data.max_length": "64", "train.progress": "false", "train.log_every": "50"}
RUNS: dict[str, dict[str, str]] = {
    "backprop-lora": {"method.name": "lora", "train.optimizer": "adamw", "train.lr": "1e-3",
                      "train.max_steps": "60", "train.batch_size": "8", "train.eval_every": "20",
                      "train.warmup_steps": "5"},
    "mezo-lora": {"method.name": "lora", "train.optimizer": "mezo", "train.lr": "1e-4",
                  "train.zo_eps": "1e-2", "train.max_steps": "800", "train.batch_size": "16",
                  "train.eval_every": "100", "train.schedule": "constant"},
    "mezo-prompt": {"method.name": "prompt", "train.optimizer": "mezo", "train.lr": "1e-2",
                    "train.zo_eps": "1e-1", "train.max_steps": "800", "train.batch_size": "16",
                    "train.eval_every": "100", "train.schedule": "constant"},
}


def run(name: str, overrides: dict[str, str], output: str) -> dict[str, Any]:
    """One pipeline run; test metrics before/after, steps, best step, wall and CPU seconds."""
    from petkit.train.pipeline import run_recipe
    from petkit.train.recipe import apply_overrides, load_recipe

    settings = {**COMMON, **RUNS[name], **overrides, "train.output_dir": f"{output}/{name}"}
    recipe = apply_overrides(load_recipe("default"), settings)
    cpu = time.process_time()
    report = run_recipe(recipe, echo=lambda line: print(f"  [{name}] {line}", flush=True))
    return {"run": name, "settings": settings, "before": report.before, "after": report.after,
            "steps": report.result.steps, "best_step": report.result.best_step,
            "wall_s": report.seconds, "cpu_s": time.process_time() - cpu,
            "adapter_bytes": report.adapter_bytes}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: accuracy before/after, gap to backprop LoRA, steps, CPU time."""
    ref = next((r["after"]["accuracy"] for r in rows if r["run"] == "backprop-lora"), None)
    lines = ["| run | test acc. untuned | test acc. tuned | vs backprop LoRA | steps run | "
             "best step (val.) | CPU s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gap = f"{r['after']['accuracy'] - ref:+.3f}" if ref is not None else "-"
        lines.append(f"| {r['run']} | {r['before']['accuracy']:.3f} | "
                     f"{r['after']['accuracy']:.3f} | {gap} | {r['steps']} | {r['best_step']} | "
                     f"{r['cpu_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Run the chosen runs in order and print the table (and JSON with `--json`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--set", action="append", default=[],
                        help="RUN:section.field=value override (repeatable)")
    parser.add_argument("--output", default="runs/zo_quality")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    extra: dict[str, dict[str, str]] = {name: {} for name in RUNS}
    for item in args.set:
        name, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        extra[name][key] = value
    rows = [run(name, extra[name], args.output) for name in args.runs]
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
