"""`TrainConfig.head_lr`: full trainable copies (a new task head, `modules_to_save`) train at
their own learning rate in a second optimiser group; the delta stays at `lr`. Exact update
sizes, the shared schedule, bit-exact resume (also across a changed group layout under
`resume_override`), the errors, and the CLI / recipe path."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import petkit as pk
from petkit.core.errors import CheckpointError, ConfigError
from petkit.core.model import trainable_copy_parameters
from petkit.models import head_module_names, tiny_model
from petkit.training import TrainConfig, make_stepper, train
from petkit.training.loop import preflight
from test_train import collate, lora_model, separable

LR, HEAD_LR = 1e-2, 0.5
SGD = dict(optimizer="sgd", stepper={"name": "backprop", "momentum": 0.0}, max_grad_norm=None,
           schedule="constant")


def head_model(dropout: float = 0.0) -> torch.nn.Module:
    """A tiny BERT classifier: LoRA r=4 plus full trainable copies of its new head and of the
    embeddings' LayerNorm (a copy that comes *before* the LoRA factors in parameter order, so
    the two-group optimiser order differs from the one-group order)."""
    model, _ = tiny_model("bert", task="seq-cls")
    torch.manual_seed(0)
    copies = ["bert.embeddings.LayerNorm", *head_module_names(model)]
    cfg = pk.make_config("lora", r=4, dropout=dropout, modules_to_save=copies)
    return pk.attach(model, cfg)


def trained(steps: int = 1, out: Path | None = None, model: torch.nn.Module | None = None,
            **cfg: Any) -> dict[str, torch.Tensor]:
    """The trainable tensors after `steps` steps on the separable task (batch 8)."""
    model = model if model is not None else head_model()
    base = {"max_steps": steps, "batch_size": 8, "progress": False, "lr": LR,
            "output_dir": str(out) if out else None, **cfg}
    train(model, separable(16), TrainConfig(**base), collate_fn=collate)
    return {k: p.detach().clone() for k, p in pk.trainable_parameters(model).items()}


def test_the_core_finds_the_head_by_wrapper_type() -> None:
    model = head_model()
    heads = trainable_copy_parameters(model)
    assert heads and all(".copy." in k for k in heads)
    assert set(heads) < set(pk.trainable_parameters(model))
    assert not trainable_copy_parameters(lora_model())


def test_sgd_moves_the_head_at_head_lr_and_the_delta_at_lr() -> None:
    """Plain SGD, one step: p' = p - lr_group * grad, so the two-group run's head equals a run
    at lr=head_lr and its delta a run at lr, bit for bit; the head's step is head_lr/lr as
    long (to fp32 rounding)."""
    before = {k: p.detach().clone() for k, p in pk.trainable_parameters(head_model()).items()}
    both = trained(head_lr=HEAD_LR, **SGD)
    at_lr, at_head_lr = trained(**SGD), trained(**{**SGD, "lr": HEAD_LR})
    heads = set(trainable_copy_parameters(head_model()))
    for key, value in both.items():
        assert torch.equal(value, (at_head_lr if key in heads else at_lr)[key]), key
    moved = [k for k in heads if not torch.equal(at_lr[k], before[k])]
    assert moved
    for key in moved:
        ratio = (both[key] - before[key]).norm() / (at_lr[key] - before[key]).norm()
        assert ratio.item() == pytest.approx(HEAD_LR / LR, rel=1e-2)  # fp32 rounding of p - lr g


def test_head_lr_equal_to_lr_is_bit_identical_to_none() -> None:
    cfg = dict(optimizer="adamw", warmup_steps=1, schedule="cosine")
    a, b = trained(steps=4, head_lr=LR, **cfg), trained(steps=4, **cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_both_groups_follow_the_same_schedule() -> None:
    model = head_model()
    params = pk.trainable_parameters(model)
    config = TrainConfig(lr=LR, head_lr=HEAD_LR, max_steps=6, warmup_steps=2, progress=False)
    stepper = make_stepper(params, config, 6)
    stepper.bind_model(model)
    batch = collate(separable(4))
    loss = lambda b: model(**b).loss  # noqa: E731
    for _ in range(4):
        delta, head = (g["lr"] for g in stepper.optimizer.param_groups)
        assert head == pytest.approx(delta * HEAD_LR / LR) and stepper.current_lr() == delta
        stepper.step([batch], loss)
    assert {id(p) for p in stepper.optimizer.param_groups[1]["params"]} == \
        {id(p) for p in trainable_copy_parameters(model).values()}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def _resume_run(tmp_path: Path, first: dict[str, Any], then: dict[str, Any]) -> None:
    """Train 6 steps with `first` (checkpoints every 2); resume a copy of step 2 with `then`;
    the two runs' adapters and metrics must be identical."""
    cfg = dict(max_steps=6, save_every=2, keep_checkpoints=5, eval_every=2, batch_size=6,
               warmup_steps=2, schedule="cosine", progress=False, lr=LR)
    full, part = tmp_path / "full", tmp_path / "part"
    data = separable(40)
    run = lambda out, extra: train(head_model(dropout=0.1), data[:32],  # noqa: E731
                                   TrainConfig(**{**cfg, **extra, "output_dir": str(out)}),
                                   eval_data=data[32:], collate_fn=collate)
    run(full, first)
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    assert run(part, {**then, "resume": True}).steps == 6
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_with_two_groups_is_bit_exact(tmp_path: Path, optimizer: str) -> None:
    cfg = {"head_lr": HEAD_LR / 10, "optimizer": optimizer}
    _resume_run(tmp_path, cfg, cfg)


@pytest.mark.parametrize("first,then", [({}, {"head_lr": LR}), ({"head_lr": LR}, {})],
                         ids=["one-to-two-groups", "two-to-one-group"])
def test_override_regroups_the_optimiser_state_by_parameter(tmp_path: Path, first, then) -> None:
    """head_lr=lr trains exactly as head_lr=None, so a resume that switches between them under
    resume_override continues the uninterrupted run bit for bit only if every parameter gets
    its own AdamW moments back in the other group layout."""
    _resume_run(tmp_path, first, {**then, "resume_override": True})


def test_a_changed_head_lr_is_refused_unless_overridden_and_then_applies(tmp_path: Path) -> None:
    data, cfg = separable(16), dict(max_steps=4, save_every=2, batch_size=8, progress=False,
                                    lr=LR, output_dir=str(tmp_path))
    train(head_model(), data, TrainConfig(**cfg, head_lr=1e-3), collate_fn=collate)
    with pytest.raises(CheckpointError, match="would change head_lr 0.001 -> 0.5"):
        train(head_model(), data, TrainConfig(**cfg, head_lr=HEAD_LR, resume=True), collate_fn=collate)
    model = head_model()
    params = pk.trainable_parameters(model)
    new = TrainConfig(**{**cfg, "lr": 2 * LR}, head_lr=HEAD_LR, resume=True, resume_override=True,
                      schedule="constant")  # a changed lr applies too
    stepper = make_stepper(params, new, 4)
    stepper.bind_model(model)
    old = TrainConfig(**cfg, head_lr=1e-3, schedule="constant")
    saved = make_stepper(params, old, 4)
    saved.bind_model(model)
    stepper.load_state_dict(saved.state_dict())
    assert [g["lr"] for g in stepper.optimizer.param_groups] == [2 * LR, HEAD_LR]
    assert stepper.scheduler.base_lrs == [2 * LR, HEAD_LR]


@pytest.mark.parametrize("value", [0, -1e-3, 11.0, "3e-3", True, float("nan")])
def test_a_bad_head_lr_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="TrainConfig.head_lr must be"):
        TrainConfig(head_lr=value)


@pytest.mark.parametrize("optimizer,extra", [("mezo", {}), ("zo-adam", {}),
                                             ("cma", {"stepper": {"name": "cma", "dim": 4}})])
def test_head_lr_with_a_stepper_without_groups_is_refused(optimizer: str, extra: dict) -> None:
    with pytest.raises(ConfigError, match=f"head_lr must be None for optimizer='{optimizer}'"):
        TrainConfig(optimizer=optimizer, head_lr=1e-3, **extra)


def test_head_lr_on_a_model_without_a_trainable_copy_warns_and_trains_at_lr() -> None:
    """A warning, not an error: one config (a harness grid's arm, a shared recipe) may serve a
    task with a new head and a verbaliser task without one; there head_lr changes nothing."""
    config = TrainConfig(lr=LR, head_lr=HEAD_LR, max_steps=2, progress=False,
                         label_token_ids=[7, 8])
    with pytest.warns(UserWarning, match="head_lr=0.5 has no effect: none of the trained parameters"):
        preflight(lora_model(), separable(8), config)
    model, plain = lora_model(), lora_model()
    with pytest.warns(UserWarning, match="no effect"):
        train(model, separable(8), config, collate_fn=collate)
    train(plain, separable(8), config.replace(head_lr=None), collate_fn=collate)
    a, b = pk.trainable_parameters(model), pk.trainable_parameters(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stepper_used_without_its_model_says_so() -> None:
    model = head_model()
    stepper = make_stepper(pk.trainable_parameters(model), TrainConfig(head_lr=HEAD_LR), 2)
    with pytest.raises(ConfigError, match="bind_model"):
        stepper.step([collate(separable(2))], lambda b: model(**b).loss)


def test_head_lr_round_trips_and_comes_from_a_recipe_or_a_dotted_flag(tmp_path: Path) -> None:
    from petkit.app.recipe import apply_overrides, load_recipe

    cfg = TrainConfig(head_lr=3e-3)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: minilm-l6}\ndata: {name: bbc-news}\ntrain: {lr: 1.0e-4, head_lr: 3.0e-3}\n")
    assert load_recipe(path).train.head_lr == 3e-3
    assert apply_overrides(load_recipe(path), {"train.head_lr": "5e-2"}).train.head_lr == 5e-2


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> str:
    """A 2-layer random BERT with minilm-l6's tokenizer (the CLI loads models by folder)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from petkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_cli_takes_head_lr_as_a_dotted_override(tiny_bert_folder: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from petkit.cli import main

    args = ["train", "--model", tiny_bert_folder, "--data", "bbc-news", "--steps", "2",
            "--train-size", "16", "--test-size", "8", "--max-length", "32", "--batch-size", "4",
            "--train.progress=false", "--train.head_lr=3e-3"]
    assert main([*args, "--output", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["train"]["head_lr"] == 3e-3
    assert main([*args, "--optimizer", "mezo", "--output", str(tmp_path / "zo")]) == 2
    assert "head_lr must be None for optimizer='mezo'" in capsys.readouterr().err
