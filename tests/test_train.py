"""Training layer: config validation, objectives, the loop, checkpoints and exact resume.

Everything runs on petkit's tiny random models and a hand-made separable token task, so the
file takes seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import petkit as pk
from petkit.core.errors import CheckpointError, ConfigError
from petkit.models import head_module_names, tiny_model
from petkit.training import TrainConfig, TrainResult, evaluate, register_stepper, train
from petkit.training.batching import DataPosition, epoch_order, micro_batches
from petkit.training.objectives import Verbaliser
from petkit.training.schedule import lr_factor

LABEL_IDS = [7, 8]


def collate(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padding collate for the hand-made examples (labels: int or list)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, :len(b["input_ids"])] = 1
    if isinstance(batch[0]["labels"], int):
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([b["labels"] for b in batch])}
    labels = torch.full((len(batch), width), -100)
    for i, b in enumerate(batch):
        labels[i, :len(b["labels"])] = torch.tensor(b["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def separable(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Class 0 uses tokens 10-29, class 1 tokens 40-59; variable lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=gen))
        low = 10 if i % 2 == 0 else 40
        ids = torch.randint(low, low + 20, (length,), generator=gen).tolist() + [5]
        out.append({"input_ids": ids, "labels": i % 2})
    return out


def lora_model(arch: str = "llama", r: int = 4, **cfg: Any) -> torch.nn.Module:
    model, _ = tiny_model(arch)
    torch.manual_seed(0)  # the delta's own init draws from the global RNG
    return pk.attach(model, pk.make_config("lora", r=r, **cfg))


def run(model: torch.nn.Module, data: Sequence[dict[str, Any]],
        eval_data: Sequence[dict[str, Any]] | None = None, **cfg: Any) -> TrainResult:
    """Verbaliser training on the separable task with small defaults."""
    config = TrainConfig(**{"lr": 1e-2, "max_steps": 12, "batch_size": 8, "progress": False,
                            "label_token_ids": LABEL_IDS, **cfg})
    return train(model, data, config, eval_data=eval_data, collate_fn=collate)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("lr", 0), ("lr", -1.0), ("max_steps", 0), ("batch_size", 0), ("grad_accum", 1.5),
    ("optimizer", "adam"), ("schedule", "step"), ("precision", "fp16"), ("warmup_ratio", 1.0),
    ("keep_checkpoints", 0), ("log_every", 0), ("early_stopping_patience", 0),
    ("label_token_ids", [3]), ("resume", "yes"), ("max_grad_norm", 0.0),
])
def test_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_config_json_round_trip_and_unknown_keys() -> None:
    cfg = TrainConfig(lr=3e-4, epochs=2.5, max_steps=None, label_token_ids=[3, 4], seed=7)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="no field"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="output_dir"):
        TrainConfig(resume=True)


def test_schedules() -> None:
    assert lr_factor(0, 10, 0, "constant") == 1.0
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 10, 3, "linear") == pytest.approx(0.25)


def test_data_order_is_seeded_and_position_resumes() -> None:
    data = [{"input_ids": [i + 1], "labels": 0} for i in range(10)]
    cfg = TrainConfig(batch_size=4, grad_accum=2, seed=3)
    assert epoch_order(10, 3, 0) == epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    pos = DataPosition()
    stream = micro_batches(data, cfg, pos, collate)
    first = [next(stream) for _ in range(3)]
    assert len(first[0]) == 2 and (pos.epoch, pos.index) == (1, 10)
    saved = DataPosition(pos.epoch, pos.index)
    later = next(stream)
    again = next(micro_batches(data, cfg, saved, collate))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(later, again))


# --- objectives and the loop -----------------------------------------------------------------


def test_verbaliser_reads_the_last_real_token() -> None:
    model = lora_model()
    data = separable(6)
    batch = collate(data)
    fast = Verbaliser(LABEL_IDS).class_logits(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1
    slow = full[torch.arange(len(last)), last][:, LABEL_IDS]
    torch.testing.assert_close(fast, slow)


def test_verbaliser_training_learns_and_touches_only_the_delta() -> None:
    model = lora_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(pk.trainable_parameters(model))
    data = separable(64)
    before = evaluate(model, data[48:], collate_fn=collate, label_token_ids=LABEL_IDS)
    result = run(model, data[:40], data[40:48], max_steps=40, eval_every=10)
    after = evaluate(model, data[48:], collate_fn=collate, label_token_ids=LABEL_IDS)
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.8
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and changed <= {k for k in base if any(k.endswith(t) for t in trainable)}
    assert result.metric == "accuracy" and result.best_metric is not None
    assert result.best_metric >= 0.75 and result.best_step is not None


def test_head_classification_with_modules_to_save() -> None:
    model, _ = tiny_model("bert", task="seq-cls")
    heads = head_module_names(model)
    pk.attach(model, pk.make_config("lora", r=4, modules_to_save=heads))
    data = separable(64)
    cfg = TrainConfig(lr=1e-2, max_steps=30, batch_size=8, progress=False)
    train(model, data[:48], cfg, collate_fn=collate)
    assert evaluate(model, data[48:], collate_fn=collate)["accuracy"] >= 0.9


def test_causal_lm_objective_reports_loss_only() -> None:
    model = lora_model("gpt2")
    data = [{"input_ids": [3, 4, 5, 6] * 2, "labels": [-100, -100, 5, 6] * 2} for _ in range(16)]
    before = evaluate(model, data, collate_fn=collate)
    result = train(model, data, TrainConfig(lr=1e-2, max_steps=20, progress=False),
                   eval_data=data, collate_fn=collate)
    after = evaluate(model, data, collate_fn=collate)
    assert set(after) == {"loss"} and after["loss"] < before["loss"]
    assert result.metric == "loss"


def test_best_step_is_restored_and_early_stopping_stops() -> None:
    model = lora_model()
    data = separable(32)
    # A huge lr diverges after the first evaluations; patience stops it, best comes back.
    result = run(model, data[:24], data[24:], lr=5.0, max_steps=60, eval_every=2,
                 early_stopping_patience=2, max_grad_norm=None, optimizer="sgd")
    assert result.steps < 60
    final = evaluate(model, data[24:], collate_fn=collate, label_token_ids=LABEL_IDS)
    assert final["accuracy"] == result.best_metric


def test_no_trainable_parameters_is_a_clear_error() -> None:
    model, _ = tiny_model("llama")
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="attach"):
        run(model, separable(8))


def test_a_new_stepper_plugs_in_without_touching_the_loop() -> None:
    calls: list[int] = []

    class SignDescent:
        def __init__(self, params: dict[str, torch.nn.Parameter], config: TrainConfig,
                     total: int) -> None:
            self.params, self.lr = list(params.values()), config.lr

        def step(self, micro_batches: Sequence[Any], loss_fn: Any) -> float:
            with torch.no_grad():  # a derivative-free probe, like a zeroth-order stepper
                loss = float(sum(loss_fn(b) for b in micro_batches))
            calls.append(1)
            return loss

        def current_lr(self) -> float:
            return self.lr

        def state_dict(self) -> dict[str, Any]:
            return {"calls": len(calls)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    register_stepper("probe-test")(SignDescent)
    run(lora_model(), separable(16), stepper="probe-test", max_steps=5)
    assert len(calls) == 5
    with pytest.raises(ConfigError, match="stepper"):
        run(lora_model(), separable(16), stepper="nope")


# --- outputs, checkpoints, resume ----------------------------------------------------------


def test_outputs_written(tmp_path: Path) -> None:
    data = separable(40)
    result = run(lora_model(), data[:32], output_dir=str(tmp_path), eval_every=4, log_every=2)
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert result.adapter_path == str(tmp_path / "adapter")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [2, 4, 6, 8, 10, 12]
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert "train_loss" in (tmp_path / "train.log").read_text()
    assert result.seconds > 0 and result.peak_memory_mb > 0
    fresh, _ = tiny_model("llama")
    pk.load_adapter(fresh, result.adapter_path)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "adapter.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_is_bit_exact(tmp_path: Path, optimizer: str) -> None:
    data = separable(40)
    # Dropout on, so RNG state must be restored too.
    cfg = dict(max_steps=9, save_every=3, keep_checkpoints=5, eval_every=3, grad_accum=2,
               batch_size=6, optimizer=optimizer, warmup_steps=2, schedule="cosine")
    full, part = tmp_path / "full", tmp_path / "part"
    train(lora_model(dropout=0.1), data[:32], _cfg(full, **cfg), eval_data=data[32:],
          collate_fn=collate)
    # "Interrupt" after step 3: keep only that checkpoint, then resume on a fresh model.
    shutil.copytree(full / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    result = train(lora_model(dropout=0.1), data[:32], _cfg(part, resume=True, **cfg),
                   eval_data=data[32:], collate_fn=collate)
    assert result.steps == 9
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (part / "metrics.jsonl").read_text().splitlines()
    assert rows == (full / "metrics.jsonl").read_text().splitlines()


def _cfg(out: Path, **cfg: Any) -> TrainConfig:
    base = {"lr": 1e-2, "progress": False, "label_token_ids": LABEL_IDS, "output_dir": str(out)}
    return TrainConfig(**{**base, **cfg})


def test_resume_after_a_real_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = separable(32)
    cfg = dict(max_steps=8, save_every=2, batch_size=8)
    train(lora_model(dropout=0.1), data, _cfg(tmp_path / "full", **cfg), collate_fn=collate)
    from petkit.training import loop

    real = loop.ckpt.save_checkpoint

    def crash_after_step_4(*args: Any, **kwargs: Any) -> Path:
        path = real(*args, **kwargs)
        if path.name == "step-4":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(dropout=0.1), data, _cfg(tmp_path / "cut", **cfg), collate_fn=collate)
    monkeypatch.setattr(loop.ckpt, "save_checkpoint", real)
    # A half-written temp folder from the crash must be ignored.
    (tmp_path / "cut" / "checkpoints" / ".tmp-step-6-999").mkdir()
    train(lora_model(dropout=0.1), data, _cfg(tmp_path / "cut", resume=True, **cfg),
          collate_fn=collate)
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    run(lora_model(), separable(16), output_dir=str(tmp_path), save_every=2, keep_checkpoints=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-10", "step-12"]
    blob = torch.load(tmp_path / "checkpoints" / "step-12" / "state.pt", weights_only=True)
    assert "optimizer" in blob["stepper"] and "torch" in blob["rng"]


@pytest.mark.parametrize("damage", ["tensor", "json", "seed", "shape"])
def test_bad_checkpoint_is_a_checkpoint_error(tmp_path: Path, damage: str) -> None:
    data = separable(16)
    run(lora_model(), data, output_dir=str(tmp_path), save_every=4, max_steps=4)
    step = tmp_path / "checkpoints" / "step-4"
    model, overrides = lora_model(), {}
    if damage == "tensor":
        (step / "trainable.safetensors").write_bytes(b"garbage")
    elif damage == "json":
        (step / "trainer.json").write_text("{not json")
    elif damage == "seed":
        overrides = {"seed": 1}
    else:
        model = lora_model(r=2)
    with pytest.raises(CheckpointError):
        run(model, data, output_dir=str(tmp_path), resume=True, max_steps=8, **overrides)


def test_epochs_and_bf16_autocast() -> None:
    model, data = lora_model(), separable(20)
    result = run(model, data, max_steps=None, epochs=2, batch_size=8, precision="bf16")
    assert result.steps == 6  # 2 epochs of 3 batches (8, 8, 4)
    assert result.history[-1]["epoch"] == 2.0
    # Autocast computes in bf16; the trained tensors stay fp32.
    assert all(p.dtype == torch.float32 for p in pk.trainable_parameters(model).values())
