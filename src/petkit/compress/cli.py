"""`petkit train --prune loraprune|apt --sparsity S`: pruning while tuning, from the recipe pipeline.

The recipe's `model.prune` / `model.sparsity` become a `PruneConfig`; `run_recipe` calls the hooks
below around training: gates and gradient hooks after the LoRA is attached, then, after training,
`finish_pruning` (merge, slice, shrink the config), the pruned model saved as a Hugging Face
folder (`<output>/pruned`, with the tokenizer), and a reload check: that folder read back with
`from_pretrained` gives the in-memory pruned model's logits. The final test then scores the
pruned model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from petkit.app.pipeline import Prepared, RunHooks, sample_batch, save_folder
from petkit.app.recipe import Recipe
from petkit.compress.prune import PruneConfig, finish_pruning, start_pruning


def pruning_hooks(recipe: Recipe) -> RunHooks | None:
    """The hooks that prune as `recipe.model` says, or None when it asks for no pruning."""
    if not recipe.model.prune:
        return None
    config = PruneConfig(sparsity=recipe.model.sparsity, method=recipe.model.prune)

    def trained(prep: Prepared, output: Path) -> dict[str, Any]:
        report = finish_pruning(prep.model)
        folder = save_folder(prep.model, prep.tokenizer, output / "pruned")
        kept = {k: v for k, v in report.items() if v is not None and k != "sparsity_reached"}
        return {"pruned model": str(folder), **kept,
                "reloaded max |logit difference|": f"{reload_difference(prep, folder):.2e}"}

    return RunHooks(attached=lambda prep: start_pruning(prep.model, config), trained=trained)


def reload_difference(prep: Prepared, folder: Path, size: int = 4) -> float:
    """Largest |logit| difference between the pruned model and `from_pretrained(folder)` on test rows."""
    reloaded = type(prep.model).from_pretrained(folder).eval()
    ids = sample_batch(prep, size)["input_ids"]
    was_training = prep.model.training
    prep.model.eval()
    with torch.no_grad():
        got, expected = reloaded(input_ids=ids).logits, prep.model(input_ids=ids).logits
    prep.model.train(was_training)
    return float((got.float() - expected.float()).abs().max())
