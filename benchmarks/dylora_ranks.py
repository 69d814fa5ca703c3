"""DyLoRA: test accuracy against rank from ONE training run, on both embedded settings.

Each setting trains one DyLoRA adapter over ranks 1..8 (a rank is drawn per step), saves it, then
tests the saved adapter truncated to every rank - no retraining. This is what

    petkit train --method dylora --dylora-eval-ranks 1,2,3,4,5,6,7,8
    petkit train --recipe minilm-bbc --method dylora --dylora-eval-ranks 1,2,3,4,5,6,7,8

print; this script runs the same pipeline for both, writes docs/dylora_ranks.json, draws
docs/dylora-ranks.png and prints the Markdown table of docs/methods.md's DyLoRA section.

    python benchmarks/dylora_ranks.py             # ~10 min on 2 CPU cores
    python benchmarks/dylora_ranks.py --render    # redraw from the JSON only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "docs" / "dylora_ranks.json"
OUT_PNG = ROOT / "docs" / "dylora-ranks.png"
RANKS = list(range(1, 9))
SETTINGS = {  # recipe name -> label
    "default": "rotten-tomatoes · smollm2-135m",
    "minilm-bbc": "bbc-news · minilm-l6",
}


def run_setting(recipe_name: str) -> dict[str, Any]:
    from petkit.app.pipeline import run_recipe
    from petkit.app.rank_sweep import evaluate_at_ranks
    from petkit.app.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe(recipe_name), {
        "method.name": "dylora", "method.r": "8", "method.min_rank": "1",
        "train.progress": "false", "train.output_dir": f"runs/dylora-ranks/{recipe_name}"})
    report = run_recipe(recipe, echo=lambda line: print(f"  [{recipe_name}] {line}", flush=True))
    sweep = evaluate_at_ranks(report.recipe, report.result.adapter_path, RANKS)
    return {"label": SETTINGS[recipe_name], "untuned": report.before["accuracy"],
            "trained_at_max_rank": report.after["accuracy"],
            "steps": report.result.steps, "seconds": round(report.seconds, 1),
            "by_rank": {str(r): m["accuracy"] for r, m in sweep.items()}}


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6))
    for ax, (name, res) in zip(list(axes), results.items()):
        ranks = [int(r) for r in res["by_rank"]]
        ax.plot(ranks, [100 * a for a in res["by_rank"].values()], "o-", label="DyLoRA, one run")
        ax.axhline(100 * res["untuned"], color="grey", ls="--", label="untuned")
        ax.set(title=SETTINGS[name], xlabel="rank used at test time", ylabel="test accuracy (%)",
               xticks=ranks)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only redraw from docs/dylora_ranks.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(OUT_JSON.read_text())
    else:
        results = {name: run_setting(name) for name in SETTINGS}
        OUT_JSON.write_text(json.dumps(results, indent=1))
    plot(results)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from methods_doc import dylora_table

    print(dylora_table(results))


if __name__ == "__main__":
    main()
