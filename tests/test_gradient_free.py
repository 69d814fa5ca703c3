"""Gradient-free steppers: zeroth-order SPSA / MeZO (+ log replay) and CMA-ES in a subspace.

Closed-form checks on quadratics, exact-restore and replay checks on petkit's tiny random models
with the hand-made separable task of test_train, bad input before any step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import petkit as pk
from petkit.core.errors import AdapterLoadError, ConfigError
from petkit.models import tiny_model
from petkit.training import TrainConfig, evaluate, make_stepper, train
from petkit.training.steppers.backprop import BackpropStepper
from petkit.training.steppers.cma_es import CmaStepper
from petkit.training.steppers.noise import SeededNoise, step_seed
from petkit.training.steppers.zeroth import ZOSettings, ZOStepper, replay_mezo
from test_train import LABEL_IDS, collate, lora_model, separable

Batch = dict[str, torch.Tensor]


def quadratic(seed: int = 0, dim: int = 12) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
    """x, A (SPD), b of f(x) = 0.5 x'Ax + b'x, in float64 so differences are exact enough."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T / dim + torch.eye(dim, dtype=torch.float64)
    x = nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
    return x, a, torch.randn(dim, generator=gen, dtype=torch.float64)


def quad_loss(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):  # noqa: ANN201
    return lambda _batch: 0.5 * x @ a @ x + b @ x


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in params.items()}


def model_loss(model: nn.Module, data: list[dict[str, Any]]):  # noqa: ANN201
    batch = collate(data[:8])
    from petkit.training.objectives import Verbaliser

    objective = Verbaliser(LABEL_IDS)
    return batch, lambda b: objective(model, b).loss


# --- zeroth-order: restore, seeds, estimate ------------------------------------------------


@pytest.mark.parametrize("n_spsa", [1, 3])
def test_lr_zero_step_restores_every_parameter_exactly_with_a_copy(n_spsa: int) -> None:
    model = lora_model(dropout=0.1)
    params = pk.trainable_parameters(model)
    before = snapshot(params)
    batch, loss = model_loss(model, separable(8))
    stepper = ZOStepper(params, ZOSettings(lr=0.0, eps=1e-2, n_spsa=n_spsa, weight_decay=0.1))
    assert stepper.exact
    stepper.step([batch], loss)
    assert all(torch.equal(before[k], p) for k, p in params.items())


def test_lr_zero_step_restores_full_parameters_within_1e_6_without_a_copy() -> None:
    model, _ = tiny_model("llama")
    params = dict(model.named_parameters())
    before = snapshot(params)
    batch, loss = model_loss(model, separable(8))
    stepper = ZOStepper(params, ZOSettings(lr=0.0, eps=1e-3, n_spsa=2, exact_restore=False))
    stepper.step([batch], loss)
    worst = max(float((before[k] - p.detach()).abs().max()) for k, p in params.items())
    assert worst <= 1e-6  # no copy kept: float32 rounding only


def test_same_seed_gives_the_same_perturbation() -> None:
    params = [torch.zeros(3, 4), torch.zeros(5)]
    noise = SeededNoise(params)
    first, again, other = (list(noise.stream(s)) for s in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1) != step_seed(0, 3, 0) != step_seed(1, 3, 1)
    noise.perturb(7, 0.5)  # in place: p += 0.5 z(7)
    assert torch.equal(params[0], 0.5 * first[0])


def test_estimate_matches_the_true_directional_derivative_on_a_quadratic() -> None:
    x, a, b = quadratic()
    stepper = ZOStepper({"x": x}, ZOSettings(lr=0.0, eps=1e-3))
    true_grad = a @ x.detach() + b
    for seed in range(20):
        estimate, _ = stepper._probe(seed, lambda: float(quad_loss(x, a, b)(None)))
        z = next(stepper.noise.stream(seed))
        exact = float(z @ true_grad)  # central differences are exact on a quadratic
        assert (estimate > 0) == (exact > 0)
        assert estimate == pytest.approx(exact, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("settings", [
    dict(rule="sgd", lr=0.02), dict(rule="sgd", lr=0.01, momentum=0.9, n_spsa=4),
    dict(rule="adam", lr=0.05, n_spsa=2)])
def test_zeroth_order_rules_descend_a_quadratic(settings: dict[str, Any]) -> None:
    x, a, b = quadratic(1)
    loss = quad_loss(x, a, b)
    start = float(loss(None))
    stepper = ZOStepper({"x": x}, ZOSettings(eps=1e-3, total_steps=300, **settings))
    for _ in range(300):
        stepper.step([{}], loss)
    optimum = float(-0.5 * b @ torch.linalg.solve(a, b))
    assert float(loss(None)) - optimum < 0.1 * (start - optimum)


def test_mezo_trains_a_lora_delta_through_train() -> None:
    model = lora_model()
    data = separable(48)
    before = evaluate(model, data, collate_fn=collate, label_token_ids=LABEL_IDS)["loss"]
    cfg = TrainConfig(optimizer="mezo", lr=0.02, zo_eps=1e-2, zo_n_spsa=2, max_steps=60,
                      batch_size=16, schedule="constant", progress=False,
                      label_token_ids=LABEL_IDS)
    train(model, data, cfg, collate_fn=collate)
    after = evaluate(model, data, collate_fn=collate, label_token_ids=LABEL_IDS)["loss"]
    assert after < before - 0.05


# --- replay of a (seed, grad) log ---------------------------------------------------------


def _cfg(out: Path, **cfg: Any) -> TrainConfig:
    base = dict(optimizer="mezo", lr=0.02, zo_eps=1e-2, zo_n_spsa=2, zo_momentum=0.5,
                weight_decay=0.01, max_steps=8, batch_size=8, schedule="cosine",
                warmup_steps=2, zo_log=True, output_dir=str(out), progress=False,
                label_token_ids=LABEL_IDS)
    return TrainConfig(**{**base, **cfg})


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def test_replayed_log_rebuilds_the_trained_adapter_exactly(tmp_path: Path) -> None:
    train(lora_model(dropout=0.1), separable(32), _cfg(tmp_path), collate_fn=collate)
    log = tmp_path / "zo_log.jsonl"
    header = json.loads(log.read_text().splitlines()[0])
    assert header["exact_restore"] and len(log.read_text().splitlines()) == 9
    assert log.stat().st_size < 8000  # the trained adapter rebuilt from a few KB
    model = replay_mezo(lora_model(dropout=0.1), log)
    trained = _adapter(tmp_path)
    rebuilt = pk.adapter_state(model, "default")
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    partial = replay_mezo(lora_model(dropout=0.1), log, steps=3)
    assert not torch.equal(pk.adapter_state(partial, "default")[next(iter(trained))],
                           trained[next(iter(trained))])


def test_replay_without_a_copy_redoes_the_rounding_exactly(tmp_path: Path) -> None:
    model, _ = tiny_model("llama")
    params = dict(model.named_parameters())
    batch, loss = model_loss(model, separable(8))
    settings = ZOSettings(lr=1e-3, eps=1e-3, rule="adam", exact_restore=False, total_steps=4)
    stepper = ZOStepper(params, settings, tmp_path / "log.jsonl")
    for _ in range(4):
        stepper.step([batch], loss)
    fresh, _ = tiny_model("llama")
    replay_mezo(fresh, tmp_path / "log.jsonl", params=dict(fresh.named_parameters()))
    assert all(torch.equal(p, fresh.get_parameter(k)) for k, p in params.items())


def test_replay_refuses_a_different_initial_delta(tmp_path: Path) -> None:
    train(lora_model(), separable(16), _cfg(tmp_path, max_steps=2), collate_fn=collate)
    model, _ = tiny_model("llama")
    torch.manual_seed(123)  # another init of the LoRA delta
    pk.attach(model, pk.make_config("lora", r=4))
    with pytest.raises(AdapterLoadError, match="initial"):
        replay_mezo(model, tmp_path / "zo_log.jsonl")
    with pytest.raises(AdapterLoadError, match="do not match"):
        replay_mezo(lora_model(r=2), tmp_path / "zo_log.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(AdapterLoadError, match="not a petkit"):
        replay_mezo(lora_model(), tmp_path / "bad.jsonl")


def test_resume_trims_the_log_and_is_exact(tmp_path: Path) -> None:
    data, full, part = separable(32), tmp_path / "full", tmp_path / "part"
    cfg = dict(save_every=3, keep_checkpoints=5)
    train(lora_model(dropout=0.1), data, _cfg(full, **cfg), collate_fn=collate)
    shutil.copytree(full / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    shutil.copy(full / "zo_log.jsonl", part / "zo_log.jsonl")  # all 8 steps: 4-8 must go
    train(lora_model(dropout=0.1), data, _cfg(part, resume=True, **cfg), collate_fn=collate)
    assert (part / "zo_log.jsonl").read_text() == (full / "zo_log.jsonl").read_text()
    a, b = _adapter(full), _adapter(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- CMA-ES in a subspace ------------------------------------------------------------------


def test_cma_es_finds_a_target_inside_its_subspace() -> None:
    x = nn.Parameter(torch.zeros(40))
    probe = CmaStepper({"x": x}, dim=4, sigma=0.5, popsize=8, seed=3)
    target = probe.theta0 + torch.tensor([1.0, -2.0, 0.5, 1.5]) @ probe.basis
    stepper = CmaStepper({"x": x}, dim=4, sigma=0.5, popsize=8, seed=3)

    def loss(_batch: Batch) -> torch.Tensor:
        return ((x - target) ** 2).sum()

    start = float(loss({}))
    for _ in range(60):
        stepper.step([{}], loss)
    assert float(loss({})) < 1e-3 * start


def test_cma_es_resumes_exactly_from_its_state() -> None:
    x = nn.Parameter(torch.zeros(30))
    first = CmaStepper({"x": x}, dim=5, sigma=0.3, seed=1)
    loss = lambda _b: (x - 1).pow(2).sum()  # noqa: E731
    for _ in range(5):
        first.step([{}], loss)
    second = CmaStepper({"x": nn.Parameter(torch.zeros(30))}, dim=5, sigma=0.3, seed=1)
    second.load_state_dict(first.state_dict())
    assert second.current_lr() == first.current_lr()
    assert (first.es.ask()[0] == second.es.ask()[0]).all()


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_cma_population_is_batched_and_matches_one_by_one(method: str) -> None:
    model, _ = tiny_model("llama")
    torch.manual_seed(0)
    pk.attach(model, pk.make_config(method))
    params = pk.trainable_parameters(model)
    batch, loss = model_loss(model, separable(8))
    stepper = CmaStepper(params, dim=6, sigma=0.1, popsize=5)
    stepper.bind_model(model)
    thetas = stepper._thetas(stepper.es.ask())
    batched = stepper._vmapped(thetas, [batch], loss)
    single = stepper._one_by_one(thetas, [batch], loss)
    assert batched == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert len(set(single)) == 5  # the members really differ
    stepper.step([batch], loss)
    assert stepper.batched is True


def test_cma_trains_through_train() -> None:
    model = lora_model()
    data = separable(48)
    before = evaluate(model, data, collate_fn=collate, label_token_ids=LABEL_IDS)["loss"]
    cfg = TrainConfig(optimizer="cma", es_dim=8, es_sigma=0.05, es_popsize=6, max_steps=25,
                      batch_size=16, progress=False, label_token_ids=LABEL_IDS)
    train(model, data, cfg, collate_fn=collate)
    after = evaluate(model, data, collate_fn=collate, label_token_ids=LABEL_IDS)["loss"]
    assert after < before - 0.05


# --- selection and bad input ----------------------------------------------------------------


def test_optimizer_selects_the_stepper() -> None:
    params = pk.trainable_parameters(lora_model())
    chosen = {opt: type(make_stepper(params, TrainConfig(optimizer=opt, es_dim=4), 10))
              for opt in ("adamw", "sgd", "mezo", "zo-adam", "cma")}
    assert chosen == {"adamw": BackpropStepper, "sgd": BackpropStepper, "mezo": ZOStepper,
                      "zo-adam": ZOStepper, "cma": CmaStepper}
    assert make_stepper(params, TrainConfig(optimizer="zo-adam"), 10).rule.__class__.__name__ \
        == "AdamRule"
    with pytest.raises(ConfigError, match="stepper"):
        TrainConfig(optimizer="mezo", stepper="backprop")


@pytest.mark.parametrize("field,value", [
    ("zo_eps", 0.0), ("zo_eps", -1e-3), ("zo_n_spsa", 0), ("zo_momentum", 1.0),
    ("es_dim", 1), ("es_popsize", 1), ("es_sigma", 0.0), ("zo_log", "yes")])
def test_config_rejects_bad_gradient_free_values(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match="output_dir"):
        TrainConfig(zo_log=True)


@pytest.mark.parametrize("optimizer", ["mezo", "cma"])
def test_no_trainable_parameters_is_a_config_error(optimizer: str) -> None:
    model, _ = tiny_model("llama")
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(model, separable(8), TrainConfig(optimizer=optimizer, progress=False,
                                               label_token_ids=LABEL_IDS), collate_fn=collate)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        ZOStepper({}, ZOSettings(lr=1e-3))


def test_subspace_larger_than_the_delta_fails_before_training() -> None:
    model = lora_model(r=1, targets=["q_proj"])
    size = sum(p.numel() for p in pk.trainable_parameters(model).values())
    before = snapshot(pk.trainable_parameters(model))
    cfg = TrainConfig(optimizer="cma", es_dim=size + 1, progress=False, label_token_ids=LABEL_IDS)
    with pytest.raises(ConfigError, match="es_dim"):
        train(model, separable(8), cfg, collate_fn=collate)
    assert all(torch.equal(before[k], p) for k, p in pk.trainable_parameters(model).items())


@pytest.mark.parametrize("field,value", [("eps", 0.0), ("n_spsa", 0), ("lr", -1.0),
                                         ("rule", "lion")])
def test_zo_settings_reject_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        ZOSettings(**{"lr": 1e-3, field: value})


# --- CLI: --optimizer and replay on the embedded model ---------------------------------------


@pytest.mark.slow
def test_cli_mezo_run_is_rebuilt_by_petkit_replay(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from petkit.cli import main

    run = tmp_path / "run"
    args = ["train", "--optimizer", "mezo", "--eps", "1e-2", "--n-spsa", "2", "--steps", "3",
            "--lr", "1e-4", "--train-size", "16", "--test-size", "4", "--max-length", "32",
            "--batch-size", "2", "--output", str(run), "--train.zo_log=true",
            "--train.progress=false"]
    assert main(args) == 0
    assert main(["replay", "--log", str(run / "zo_log.jsonl"), "--output",
                 str(tmp_path / "rebuilt")]) == 0
    assert "rebuilt from" in capsys.readouterr().out
    trained = load_file(str(run / "adapter" / "adapter.safetensors"))
    rebuilt = load_file(str(tmp_path / "rebuilt" / "adapter.safetensors"))
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    again = ["replay", "--log", str(run / "zo_log.jsonl"), "--output", str(tmp_path / "rebuilt")]
    assert main(again) == 2 and "--overwrite replaces" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert main(["train", "--optimizer", "mezo", "--eps", "0"]) == 2
    assert "zo_eps" in capsys.readouterr().err
