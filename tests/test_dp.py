"""DP adapters (training/dp.py): per-example clipping against a hand loop, the accountant against
Opacus' own, the budget in the log and in adapter.json, refusals."""
from __future__ import annotations

import json

import pytest
import torch

import petkit as pk
from petkit.app.recipe import apply_overrides, recipe_from_dict
from petkit.core.errors import ConfigError
from petkit.models import tiny_model
from petkit.training.dp import (DPConfig, DPStepper, clipped_sum, noise_multiplier,
                                per_example_grads, spent_epsilon)
from petkit.training.steppers.backprop import BackpropConfig, BackpropStepper

pytest.importorskip("opacus")


def _lora_model() -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    model, _ = tiny_model("llama")
    pk.attach(model, pk.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():  # B != 0, so every factor has a gradient
        for name, p in pk.trainable_parameters(model).items():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, dict(pk.trainable_parameters(model))


def _batch(rows: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, as the loop's collate makes them."""
    ids = torch.randint(1, 128, (rows, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, 9 - i % 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_fn(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    return lambda batch: model(**batch).loss


def _hand_grads(model, params, batch):  # type: ignore[no-untyped-def]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
        rows.append([p.grad.clone() for p in params.values()])
    model.zero_grad()
    return rows


@pytest.mark.parametrize("vectorised", [True, False])
def test_per_example_gradients_equal_one_backward_per_example(vectorised: bool) -> None:
    model, params = _lora_model()
    batch = _batch()
    grads, losses = per_example_grads(model, params, _loss_fn(model), batch, vectorised)
    for i, row in enumerate(_hand_grads(model, params, batch)):
        for got, want in zip(grads, row):
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-7)
        assert want.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(losses[2], model(**{k: v[2:3] for k, v in _batch().items()}).loss)


def test_per_example_gradients_of_an_encoder_with_a_new_head_equal_one_backward_each() -> None:
    # the DP search ran on MiniLM + a classification head (docs/privacy.md): the vmap path's 4-D
    # mask on a bidirectional encoder, the head's copy (modules_to_save) included
    from petkit.models import head_module_names

    model, _ = tiny_model("bert", task="seq-cls")
    pk.attach(model, pk.LoraConfig(r=2, targets=["query", "value"], modules_to_save=head_module_names(model)))
    model.eval()
    with torch.no_grad():
        for name, p in pk.trainable_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    params = dict(pk.trainable_parameters(model))
    batch = {**_batch(4), "labels": torch.tensor([0, 1, 1, 0])}
    grads, _ = per_example_grads(model, params, _loss_fn(model), batch, True)
    for i, row in enumerate(_hand_grads(model, params, batch)):
        for got, want in zip(grads, row):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)
    assert any("classifier" in name for name in params)


def test_clipping_is_exact_against_a_hand_loop() -> None:
    model, params = _lora_model()
    batch = _batch()
    grads, _ = per_example_grads(model, params, _loss_fn(model), batch)
    limit = 0.5 * float(min(torch.sqrt(sum(g[i].pow(2).sum() for g in grads)) for i in range(5)))
    expected = [torch.zeros_like(p) for p in params.values()]
    for row in _hand_grads(model, params, batch):
        norm = torch.sqrt(sum(g.pow(2).sum() for g in row))
        for acc, g in zip(expected, row):
            acc += g * min(1.0, limit / (float(norm) + 1e-6))
    for got, want in zip(clipped_sum(grads, limit), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    summed = clipped_sum(grads, limit)
    assert float(torch.sqrt(sum(s.pow(2).sum() for s in summed))) <= 5 * limit + 1e-5


def test_one_private_step_is_clip_sum_noise_divide_then_the_optimiser() -> None:
    model, params = _lora_model()
    before = {k: p.detach().clone() for k, p in params.items()}
    config = pk.TrainConfig(optimizer="sgd", lr=0.1, schedule="constant", max_grad_norm=None,
                            batch_size=5, stepper=BackpropConfig(momentum=0.0))
    dp = DPConfig(epsilon=8.0, delta=1e-5, max_grad_norm=0.05)
    stepper = DPStepper(BackpropStepper(params, config, 10), model, params, dp, 0.05, 10, 5)
    batch = _batch()
    expected = clipped_sum([torch.stack(col) for col in zip(*_hand_grads(model, params, batch))], 0.05)
    torch.manual_seed(7)
    noise = [torch.normal(0.0, stepper.sigma * 0.05, size=p.shape) for p in params.values()]
    torch.manual_seed(7)
    stepper.step([batch], _loss_fn(model))
    for (name, p), s, n in zip(params.items(), expected, noise):
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * (s + n) / 5, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("rate", "steps"), [(0.01, 300), (256 / 10_752, 48)])  # the dp-lora recipe's
def test_epsilon_equals_opacus_own_accountant_on_the_same_schedule(accountant: str, rate: float, steps: int) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    config = DPConfig(epsilon=8.0, delta=1e-5, accountant=accountant)
    sigma = noise_multiplier(config, sample_rate=rate, steps=steps)
    theirs = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        theirs.step(noise_multiplier=sigma, sample_rate=rate)
    ours = spent_epsilon(config, sigma, rate, steps)
    assert ours == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)
    assert 7.5 < ours <= 8.0 + 1e-6  # the smallest noise that meets the target


def test_training_logs_epsilon_per_step_and_writes_it_into_adapter_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, _ = _lora_model()
    data = [{"input_ids": row, "labels": row} for row in _batch(16, seed=3)["input_ids"]]
    config = pk.TrainConfig(max_steps=4, batch_size=4, lr=1e-2, log_every=1, progress=False,
                            output_dir=str(tmp_path), dp={"epsilon": 3.0, "delta": 1e-5})
    result = pk.train(model, data, config)
    spent = [row["dp_epsilon"] for row in result.history if "dp_epsilon" in row]
    assert len(spent) == 4 and spent == sorted(spent) and spent[0] > 0
    assert spent[-1] == pytest.approx(3.0, rel=0.02)
    assert result.report["dp_per_example"] == "torch.func vmap"  # the loop's real loss traced
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["privacy"]["epsilon"] == pytest.approx(spent[-1], rel=1e-3)
    assert meta["privacy"]["delta"] == 1e-5 and meta["privacy"]["steps"] == 4
    fresh, _ = tiny_model("llama")
    pk.load_adapter(fresh, tmp_path / "adapter")  # the schema accepts the privacy record


def test_the_per_example_loop_trains_the_same_adapter_as_vmap() -> None:
    """`--dp.per_example loop` (one backward per example): the same numbers, seeded noise alike."""
    data = [{"input_ids": row, "labels": row} for row in _batch(16, seed=3)["input_ids"]]
    trained = []
    for how in ("vmap", "loop"):
        model, params = _lora_model()
        result = pk.train(model, data, pk.TrainConfig(
            max_steps=3, batch_size=4, lr=1e-2, progress=False,
            dp={"epsilon": 3.0, "per_example": how}))
        assert ("vmap" in result.report["dp_per_example"]) == (how == "vmap")
        trained.append({k: v.detach().clone() for k, v in params.items()})
    for k in trained[0]:
        torch.testing.assert_close(trained[1][k], trained[0][k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="--dp.per_example must be one of vmap, loop"):
        DPConfig(per_example="batched")


def test_refused_where_it_cannot_apply() -> None:
    model, _ = _lora_model()
    data = [{"input_ids": row, "labels": row} for row in _batch(8)["input_ids"]]
    with pytest.raises(ConfigError, match="--optimizer adamw or sgd"):
        pk.train(model, data, pk.TrainConfig(optimizer="mezo", max_steps=1, progress=False, dp={}))
    with pytest.raises(ConfigError, match="more than the 8 training examples"):
        pk.train(model, data, pk.TrainConfig(batch_size=4, grad_accum=4, max_steps=1,
                                             progress=False, dp={}))
    with pytest.raises(ConfigError, match="--dp.delta"):
        DPConfig(delta=1.5)
    with pytest.raises(ConfigError, match="unknown dp option"):
        pk.TrainConfig(dp={"epsilon": 1.0, "epsilonn": 2})


def test_dp_flags_and_recipe_key_reach_the_train_section() -> None:
    recipe = apply_overrides(recipe_from_dict({}), {"dp.epsilon": "4", "dp.max_grad_norm": "0.5"})
    assert recipe.train.dp == DPConfig(epsilon=4.0, max_grad_norm=0.5)
    recipe = recipe_from_dict({"dp": {"epsilon": 2.0, "delta": 1e-6}})
    assert recipe.train.dp == DPConfig(epsilon=2.0, delta=1e-6)


def test_a_dp_run_config_round_trips_through_json_and_the_recipe_yaml() -> None:
    """`petkit train --dp.epsilon 8` writes recipe.yaml / results.json: DPConfig as a mapping."""
    import yaml

    config = pk.TrainConfig(dp={"epsilon": 8.0, "delta": 1e-5})
    assert pk.TrainConfig.from_json(config.to_json()) == config
    recipe = recipe_from_dict({"train": {"dp": {"epsilon": 8.0, "delta": 1e-5}}})
    assert yaml.safe_load(recipe.to_yaml())["train"]["dp"]["epsilon"] == 8.0
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.slow
def test_cli_dp_run_records_its_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`petkit train --dp.epsilon 8` end to end on a tiny Llama: recipe.yaml, adapter.json."""
    import yaml
    from toys import save_tiny_llama

    from petkit.cli import main

    model, out = save_tiny_llama(tmp_path / "tiny"), tmp_path / "run"
    assert main(["train", "--model", model, "--data", "rotten-tomatoes", "--steps", "3",
                 "--train-size", "24", "--test-size", "8", "--max-length", "24",
                 "--batch-size", "4", "--train.progress=false", "--dp.epsilon", "8",
                 "--dp.delta", "1e-5", "--output", str(out)]) == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["dp"]["epsilon"] == 8.0
    privacy = json.loads((out / "adapter" / "adapter.json").read_text())["privacy"]
    assert privacy["steps"] == 3 and 0 < privacy["epsilon"] <= 8.0


def test_without_noise_or_a_binding_clip_dp_trains_what_plain_training_trains(monkeypatch) -> None:
    """The DP path's mechanics on an encoder with a new head (the docs/privacy.md search's setup):
    with sigma 0 and a clip that never binds, `pk.train` with `dp` gives the same adapter and head
    as plain training (per-example sum / B == the batch-mean gradient)."""
    import petkit.training.dp as dp_module
    from petkit.models import head_module_names

    monkeypatch.setattr(dp_module, "noise_multiplier", lambda *args, **kwargs: 0.0)
    ids = torch.randint(1, 128, (16, 7), generator=torch.Generator().manual_seed(5))
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": torch.tensor(i % 2)}
            for i, row in enumerate(ids)]
    trained = []
    for dp in (None, {"epsilon": 8.0, "max_grad_norm": 1e6}):
        model, _ = tiny_model("bert", task="seq-cls")
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        pk.attach(model, pk.LoraConfig(r=2, dropout=0.0, targets=["query", "value"],
                                       modules_to_save=head_module_names(model)), seed=0)
        pk.train(model, data, pk.TrainConfig(max_steps=3, batch_size=4, lr=1e-2, progress=False,
                                             max_grad_norm=None, seed=0, dp=dp))
        trained.append({k: v.detach().clone() for k, v in pk.trainable_parameters(model).items()})
    assert any("classifier" in k for k in trained[0])
    for k in trained[0]:
        torch.testing.assert_close(trained[1][k], trained[0][k], rtol=1e-4, atol=1e-6)


def test_length_chunks_give_the_same_clipped_sum_and_are_cut_to_their_longest_row() -> None:
    """A step's rows are regrouped by length and each group cut to its longest row (less padding
    computed): the clipped per-example sum is the whole padded batch's."""
    from petkit.training.dp import by_length

    model, params = _lora_model()
    batch = _batch(7)
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(7, 5, dtype=torch.long)], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(7, 5, dtype=torch.long)], 1)
    batch["labels"] = torch.cat([batch["labels"], torch.full((7, 5), -100)], 1)
    chunks = by_length(batch, rows=3)
    assert [c["input_ids"].shape for c in chunks] == [(3, 7), (3, 9), (1, 9)]
    whole = clipped_sum(per_example_grads(model, params, _loss_fn(model), batch)[0], 0.05)
    parts = [clipped_sum(per_example_grads(model, params, _loss_fn(model), c)[0], 0.05) for c in chunks]
    for i, want in enumerate(whole):
        torch.testing.assert_close(sum(p[i] for p in parts), want, rtol=1e-5, atol=1e-7)
    scored = {**batch, "labels": batch["input_ids"]}  # a padded column is scored: never cut
    assert all(c["input_ids"].shape[1] == 14 for c in by_length(scored, rows=3))


def test_the_dp_lora_recipe_states_its_settings_and_stays_within_its_budget() -> None:
    """`petkit train --recipe dp-lora` (docs/privacy.md): the settings the docs measured, and the
    accountant's epsilon after its 48 steps at q = 256 / 10,752 (the whole pool) within the target."""
    from petkit.app.pipeline import load_recipe_task
    from petkit.app.recipe import load_recipe

    recipe = load_recipe("dp-lora")
    train = recipe.train
    assert train.dp == DPConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    assert (train.batch_size, train.grad_accum, train.max_steps, train.lr, train.head_lr) == (256, 1, 48, 1e-3, 0.3)
    assert (train.warmup_ratio, train.schedule) == (0.1, "linear")
    assert recipe.model.name == "minilm-l6" and recipe.data.name == "rotten-tomatoes"
    assert (recipe.data.train_size, recipe.data.test_size, recipe.data.max_length) == (None, 300, 48)
    method = recipe.method_config()
    assert (method.r, method.alpha, tuple(method.targets)) == (1, 2, ("encoder.layer.5.attention.self.value",))
    pool = len(load_recipe_task(recipe.data).train)
    assert pool == 10_752
    sigma = noise_multiplier(train.dp, 256 / pool, 48)
    assert sigma == pytest.approx(0.555, abs=0.005)
    assert 7.5 < spent_epsilon(train.dp, sigma, 256 / pool, 48) <= 8.0 + 1e-6


@pytest.mark.slow
def test_the_dp_lora_recipe_runs_end_to_end_and_records_its_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The recipe from the CLI on a tiny BERT (its one target renamed to the tiny model's layer)."""
    from toys import save_tiny_bert

    from petkit.cli import main

    model, out = save_tiny_bert(tmp_path / "tiny"), tmp_path / "run"
    assert main(["train", "--recipe", "dp-lora", "--model", model,
                 "--method.targets=[encoder.layer.1.attention.self.value]", "--train-size", "64",
                 "--test-size", "8", "--batch-size", "16", "--steps", "3",
                 "--train.progress=false", "--output", str(out)]) == 0
    privacy = json.loads((out / "adapter" / "adapter.json").read_text())["privacy"]
    assert privacy["steps"] == 3 and privacy["sample_rate"] == 0.25
    assert 0 < privacy["epsilon"] <= privacy["target_epsilon"] == 8.0
    assert privacy["noise_multiplier"] == pytest.approx(noise_multiplier(DPConfig(), 0.25, 3))
