"""Training edge cases: each is a ConfigError naming the field or the example (never a raw
KeyError/IndexError from torch), and an all-ignored batch is skipped and counted, not a NaN step."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.training import TrainConfig, train
from test_train import LABEL_IDS, collate, lora_model, separable


@pytest.mark.parametrize("field,value", [("seed", 2**40), ("seed", -1), ("epochs", math.inf),
                                         ("weight_decay", math.inf), ("max_grad_norm", math.nan),
                                         ("lr", math.nan)])
def test_out_of_range_and_non_finite_settings(field: str, value: Any) -> None:
    extra = {"max_steps": None} if field == "epochs" else {}
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value, **extra})


@pytest.mark.parametrize("kwargs", [{"alpha": math.nan}, {"dropout": math.nan}, {"alpha": math.inf}])
def test_method_configs_refuse_non_finite_values(kwargs: dict[str, float]) -> None:
    (field,) = kwargs
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        pk.LoraConfig(**kwargs)


def _train(model: torch.nn.Module, data: list[dict[str, Any]], **cfg: Any):
    config = TrainConfig(**{"lr": 1e-2, "max_steps": 4, "batch_size": 4, "progress": False, **cfg})
    return train(model, data, config)


def test_training_a_merged_adapter_is_refused() -> None:
    model = lora_model()
    pk.merge(model)
    with pytest.raises(ConfigError, match="merged into the base weights; pk.unmerge"):
        _train(model, separable(8), label_token_ids=LABEL_IDS)


def test_label_token_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ConfigError, match="label_token_ids holds token id 100000"):
        _train(lora_model(), separable(8), label_token_ids=[7, 100000])


def test_lm_label_outside_the_vocabulary_names_the_example() -> None:
    data = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]} for _ in range(8)]
    data[3]["labels"] = [5, 10**6, 7]
    with pytest.raises(ConfigError, match="training example 3 has label token id 1000000"):
        _train(lora_model(), data)


def test_class_label_outside_the_classes_names_the_example() -> None:
    data = separable(8)
    data[5]["labels"] = 2
    with pytest.raises(ConfigError, match="training example 5 has label 2, outside the 2 classes"):
        _train(lora_model(), data, label_token_ids=LABEL_IDS)


@pytest.mark.parametrize("key", ["labels", "input_ids"])
def test_a_missing_key_names_the_example(key: str) -> None:
    data = separable(8)
    del data[6][key]
    with pytest.raises(ConfigError, match=f"training example 6 has no '{key}'"):
        _train(lora_model(), data, label_token_ids=LABEL_IDS)


def test_a_collate_without_attention_mask_is_a_config_error() -> None:
    def no_mask(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = collate(batch)
        del out["attention_mask"]
        return out

    config = TrainConfig(lr=1e-2, max_steps=2, batch_size=4, progress=False, label_token_ids=LABEL_IDS)
    with pytest.raises(ConfigError, match="no 'attention_mask'"):
        train(lora_model(), separable(8), config, collate_fn=no_mask)


def test_an_all_ignored_batch_is_skipped_and_counted() -> None:
    data = [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4} for _ in range(4)]
    data += [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]} for _ in range(4)]
    # batch_size=4 without shuffling issues: every batch of 8 ignored examples is skipped.
    with pytest.warns(UserWarning, match="every label of the batch is ignored"):
        result = _train(lora_model(), data[:4] * 2, max_steps=2, log_every=1)
    assert result.report["skipped_batches"] == 2
    result = _train(lora_model(), data, max_steps=4, log_every=1)
    losses = [row["train_loss"] for row in result.history if "train_loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)
