"""Hybrid runs described by sections: the transfer's `TransferConfig` / hybrid recipe, and the
preference run's objective in its train section (the old keyword forms warn)."""
from __future__ import annotations

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.models import tiny_model
from test_hybrid import bert, lora_head, randomise, texts


def test_transfer_takes_its_sections_or_a_shipped_recipe() -> None:
    """A `TransferConfig` (or a hybrid recipe's transfer + train sections) is the transfer's
    description; `align=` of earlier releases gives the same tensors, with a warning."""
    import warnings

    from petkit.hybrid import (HybridRecipe, TransferConfig, hybrid_recipe_from_dict,
                               load_hybrid_recipe)

    shipped = load_hybrid_recipe("pet-gc")
    assert shipped.transfer == TransferConfig(align="hidden", align_texts=64)
    assert (shipped.train.optimizer, shipped.train.max_steps, shipped.train.lr) == ("mezo", 10, 1e-4)
    small = bert()
    pk.attach(small, lora_head())
    randomise(small)
    new, old = bert(seed=1), bert(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the section form: no warning
        pk.transfer_adapter("default", small, new, config=TransferConfig(align="embeddings"))
    with pytest.warns(DeprecationWarning, match="TransferConfig"):
        pk.transfer_adapter("default", small, old, align="embeddings")
    a, b = pk.adapter_state(new, "default"), pk.adapter_state(old, "default")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="refine_data"):  # the recipe's train section refines
        pk.transfer_adapter("default", small, bert(seed=1), recipe=shipped)
    refine = pk.TrainConfig(optimizer="mezo", max_steps=1, batch_size=2, progress=False)
    t = pk.transfer_adapter("default", small, bert(seed=1), refine_data=texts(), recipe=HybridRecipe(
        TransferConfig(align="hidden", align_texts=4), refine))
    assert t.align == "hidden" and t.refined is not None and t.refined.steps == 1
    with pytest.raises(ConfigError, match="transfer.align must be one of"):
        TransferConfig(align="vocab")
    with pytest.raises(ConfigError, match="unknown section"):
        hybrid_recipe_from_dict({"transfer": {}, "fed": {}})


def test_preference_reads_the_objective_of_its_train_section() -> None:
    """`TrainConfig(objective=dpo/rpo ...)` is the preference run's description; the `beta=` /
    `rpo_alpha=` keywords of earlier releases give the same trace, with a warning."""
    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 9], "rejected_labels": [-100, -100, 9]}] * 8

    def trace(config: pk.TrainConfig, **loose: float) -> list[dict]:
        model = tiny_model("llama")[0]
        pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]), seed=0)
        return pk.train_preference(model, pairs, config, **loose).report["dpo_trace"]

    cfg = pk.TrainConfig(lr=5e-2, max_steps=2, batch_size=4, progress=False)
    section = trace(cfg.replace(objective={"name": "rpo", "beta": 0.5, "rpo_alpha": 1.0}))
    with pytest.warns(DeprecationWarning, match="objective"):
        loose = trace(cfg, beta=0.5, rpo_alpha=1.0)
    assert section == loose and section[-1]["chosen"] - section[-1]["rejected"] > 0
