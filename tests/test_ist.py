"""IST (importance-aware sparse tuning): per-layer grouping, k layers updated per step,
response-suppression re-scoring against its closed form, logging, resume state and errors."""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.models import tiny_model
from petkit.training import TrainConfig, train
from petkit.training.steppers import ist as ist_mod
from petkit.training.steppers.ist import ISTStepper, LayerGroups
from petkit.training.steppers.backprop import BackpropStepper

LABEL_IDS = [7, 8]


def lora_llama() -> torch.nn.Module:
    model, _ = tiny_model("llama")
    pk.attach(model, pk.LoraConfig(r=2))
    return model


def examples(n: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        low = 10 if i % 2 == 0 else 40
        ids = torch.randint(low, low + 20, (5,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * 5, "labels": i % 2})
    return out


def batch_of(data: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([d[k] for d in data]) for k in data[0]}


def verbaliser_loss(model: torch.nn.Module):
    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, -1, LABEL_IDS], batch["labels"])
    return loss


def ist_stepper(model: torch.nn.Module, k: int, every: int = 10) -> ISTStepper:
    config = TrainConfig(optimizer="sgd", lr=0.5, ist_top_k=k, ist_every=every, max_grad_norm=None)
    params = pk.trainable_parameters(model)
    return ISTStepper(BackpropStepper(params, config, 10), model, params, config)


def test_groups_follow_canonical_layer_paths():
    model = lora_llama()
    groups = LayerGroups(model, pk.trainable_parameters(model))
    assert groups.num_layers == 2 and groups.layers == [0, 1]
    assert all(len(groups.params[i]) == 4 for i in (0, 1))  # q_proj, v_proj: A and B each


def test_only_the_drawn_layers_change_and_grads_are_restored():
    model = lora_llama()
    stepper = ist_stepper(model, k=1)
    params = pk.trainable_parameters(model)
    batch = batch_of(examples(4))
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in params.items()}
        stepper.step([batch], verbaliser_loss(model))
        (layer,) = stepper.chosen
        changed = {n for n, p in params.items() if not torch.equal(before[n], p)}
        assert changed and all(f"layers.{layer}." in n for n in changed)
        assert all(p.requires_grad for p in params.values())
    assert sum(stepper.report()["ist_layer_steps"].values()) == 4


def test_rescoring_matches_the_policy_gradient_closed_form(monkeypatch):
    model = lora_llama()
    stepper = ist_stepper(model, k=1)
    drawn: list[list[int]] = []
    original = ISTStepper._draw

    def recording(self, weights, count):
        out = original(self, weights, count)
        drawn.append(out)
        return out

    monkeypatch.setattr(ISTStepper, "_draw", recording)
    # A loss that only depends on which layers' deltas are on: layer 0 matters, layer 1 does not.
    wrappers = LayerGroups(model, pk.trainable_parameters(model)).wrappers

    def loss(_batch):
        return torch.tensor(1.0 if wrappers[0][0].active else 3.0)

    stepper.scores = torch.tensor([0.2, -0.1])
    start = stepper.scores.clone()
    stepper.rescore({}, loss)
    rewards = [math.exp(-(3.0 if r == [0] else 1.0)) for r in drawn]
    mean = sum(rewards) / len(rewards)
    slope = torch.sigmoid(start) * (1 - torch.sigmoid(start))
    expected = start.clone()
    for r, reward in zip(drawn, rewards):
        expected[r[0]] -= ist_mod.LR * (reward - mean) * slope[r[0]]
    assert len(drawn) == ist_mod.ROUNDS and all(len(r) == 1 for r in drawn)
    torch.testing.assert_close(stepper.scores, expected)
    assert all(w.active for ws in wrappers.values() for w in ws)  # suppression undone
    if [0] in drawn and [1] in drawn:
        assert stepper.scores[0] > start[0] and stepper.scores[1] < start[1]


def test_train_logs_layers_and_reports_counts(tmp_path):
    model = lora_llama()
    config = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, log_every=1, ist_top_k=1, ist_every=2,
                         label_token_ids=LABEL_IDS, output_dir=str(tmp_path), progress=False)
    result = train(model, examples(8), config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert len(train_rows) == 6 and all(len(r["ist_layers"]) == 1 for r in train_rows)
    assert all(len(r["ist_scores"]) == 2 for r in train_rows)
    counts = result.report["ist_layer_steps"]
    assert set(counts) == {"0", "1"} and sum(counts.values()) == 6
    assert "ist_layer_steps" in (tmp_path / "train.log").read_text()
    assert all(p.requires_grad for p in pk.trainable_parameters(model).values())


def test_state_round_trips():
    model = lora_llama()
    a = ist_stepper(model, k=1, every=1)
    batch = batch_of(examples(4))
    for _ in range(3):
        a.step([batch], verbaliser_loss(model))
    b = ist_stepper(model, k=1, every=1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scores, b.scores) and a.counts == b.counts and a.steps == b.steps
    assert a._draw(torch.ones(2), 1) == b._draw(torch.ones(2), 1)


def test_bad_ist_configurations_fail_before_training():
    with pytest.raises(ConfigError, match="ist_top_k"):
        TrainConfig(ist_top_k=0)
    with pytest.raises(ConfigError, match="ist_every"):
        TrainConfig(ist_every=0)
    with pytest.raises(ConfigError, match=r"ist_top_k must be in \[1, 2\].*got 3"):
        train(lora_llama(), examples(4), TrainConfig(max_steps=1, ist_top_k=3, progress=False,
                                                      label_token_ids=LABEL_IDS))
    prompt_model, _ = tiny_model("llama")
    pk.attach(prompt_model, pk.PromptConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="inside the blocks"):
        train(prompt_model, examples(4), TrainConfig(max_steps=1, ist_top_k=1, progress=False,
                                                      label_token_ids=LABEL_IDS))


def test_resume_with_ist_is_bit_exact(tmp_path):
    import shutil

    from safetensors.torch import load_file

    cfg = dict(max_steps=6, save_every=3, keep_checkpoints=5, batch_size=4, lr=1e-2, ist_top_k=1,
               ist_every=2, label_token_ids=LABEL_IDS, progress=False)
    full, part = tmp_path / "full", tmp_path / "part"
    train(lora_llama(), examples(12), TrainConfig(output_dir=str(full), **cfg))
    shutil.copytree(full / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    train(lora_llama(), examples(12), TrainConfig(output_dir=str(part), resume=True, **cfg))
    a, b = (load_file(str(p / "adapter" / "adapter.safetensors")) for p in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    with pytest.raises(pk.CheckpointError, match="ist_top_k"):
        train(lora_llama(), examples(12), TrainConfig(output_dir=str(part), resume=True,
                                                      **{**cfg, "ist_top_k": 2}))
