"""Continual tuning on a tiny random BERT: metrics, each strategy's invariants, reload."""
from __future__ import annotations

import json

import pytest
import torch

from petkit.continual import (STRATEGIES, SeqTask, backward_transfer, forgetting,
                              load_continual, parse_task, predict, run_continual, summarise)
from petkit.continual.model import build_classifier, encode_task
from petkit.continual.orthogonal import extend_basis, lowrank_wrappers, orthogonality, project_out
from petkit.continual.routing import Hide
from petkit.continual.strategy import Context
from petkit.continual.tasks import task_specs
from petkit.core.errors import ConfigError
from petkit.core.io import adapter_state
from petkit.core.capabilities import lowrank_factors
from petkit.core.state import adapters
from petkit.models.tiny import tiny_model


def toy_tasks(count: int = 3, per_class: int = 24, seed: int = 0) -> list[SeqTask]:
    """Task k draws tokens from its own range; class c from half of it: separable by design."""
    gen = torch.Generator().manual_seed(seed)

    def examples(task: int, n: int) -> list[dict]:
        out = []
        for label in range(2):
            low = 3 + 40 * task + 20 * label
            out += [{"input_ids": torch.randint(low, low + 20, (16,), generator=gen).tolist(),
                     "label": label} for _ in range(n)]
        return out

    return [SeqTask(f"toy{k}", ("a", "b"), examples(k, per_class), examples(k, 8))
            for k in range(count)]


def encoder() -> torch.nn.Module:
    return tiny_model("bert", task="base")[0]


def context(tasks: list[SeqTask], **options) -> Context:
    model, _ = build_classifier("tiny", [len(t.label_names) for t in tasks], encoder())
    train = [encode_task(t, off, None, 16)[0] for t, off in zip(tasks, model.offsets)]
    return Context(model, tasks, train, steps=15, lr=5e-3, options=options)


# --- metrics on a hand-built matrix -------------------------------------------------------

MATRIX = [[0.9, None, None],
          [0.6, 0.8, None],
          [0.5, 0.7, 0.9]]


def test_metrics_on_hand_built_matrix():
    out = summarise(MATRIX)
    assert out["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # task 0: best before the end 0.9 -> 0.5 (0.4); task 1: 0.8 -> 0.7 (0.1)
    assert out["forgetting"] == pytest.approx(0.25)
    assert out["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy_and_bwt_can_be_positive():
    matrix = [[0.5, None, None], [0.8, 0.6, None], [0.7, 0.9, 0.4]]
    assert forgetting(matrix) == pytest.approx(((0.8 - 0.7) + max(0.6 - 0.9, -1)) / 2)
    assert backward_transfer(matrix) == pytest.approx(((0.7 - 0.5) + (0.9 - 0.6)) / 2)


def test_joint_matrix_has_no_forgetting_and_bad_matrices_are_errors():
    assert summarise([[None, None], [0.8, 0.6]])["forgetting"] is None
    with pytest.raises(ConfigError, match="T x T"):
        summarise([[0.5, 0.4]])
    with pytest.raises(ConfigError, match="last row"):
        summarise([[0.5, None], [0.4, None]])


# --- every strategy end to end, and its files load back -----------------------------------

@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_runs_and_reloads(strategy, tmp_path):
    tasks = toy_tasks()
    result = run_continual(tasks, strategy, encoder=encoder(), steps=8, lr=5e-3,
                           output_dir=tmp_path)
    rows = result.matrix
    assert len(rows) == 3 and all(v is None or 0 <= v <= 1 for row in rows for v in row)
    assert all(v is not None for v in rows[-1])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["matrix"] == rows and (tmp_path / "accuracy.png").stat().st_size > 0
    # reload on a fresh encoder: the same predictions on every task
    loaded = load_continual(tmp_path, encoder=encoder())
    for i, task in enumerate(tasks):
        test = encode_task(task, 2 * i, None, 16)[1]
        wanted = None if loaded.uses_task_id else predict(loaded, test)
        aware = predict(loaded, test, task=i)
        acc = float((aware == torch.tensor([e["labels"] for e in test])).float().mean())
        assert acc == pytest.approx(result.matrix_task_aware[-1][i])
        if wanted is not None:
            acc = float((wanted == torch.tensor([e["labels"] for e in test])).float().mean())
            assert acc == pytest.approx(rows[-1][i])


def test_sequential_forgets_on_the_toy_and_per_task_does_not():
    seq = run_continual(toy_tasks(), "sequential", encoder=encoder(), steps=20, lr=5e-3)
    oracle = run_continual(toy_tasks(), "per-task", encoder=encoder(), steps=20, lr=5e-3)
    assert seq.metrics["forgetting"] > 0.5
    assert oracle.metrics["forgetting"] == 0.0 and oracle.uses_task_id


# --- frozen earlier adapters stay bit-for-bit unchanged ------------------------------------

@pytest.mark.parametrize("strategy", ["o-lora", "inflora", "hide", "per-task", "conpet"])
def test_frozen_adapters_are_bit_for_bit_unchanged(strategy):
    learner = STRATEGIES[strategy](context(toy_tasks(), pool=2, replay=4))
    learner.learn(0)
    first = next(iter(adapters(learner.model)))
    before = {k: v.detach().clone() for k, v in adapter_state(learner.model, first).items()}
    learner.learn(1)
    learner.learn(2)
    after = adapter_state(learner.model, first)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_conpet_pool_is_bounded_and_replay_is_limited():
    learner = STRATEGIES["conpet"](context(toy_tasks(), pool=2, replay=5))
    for t in range(3):
        learner.learn(t)
    assert list(adapters(learner.model)) == ["module0", "module1"]
    assert [len(m) for m in learner.memory.values()] == [5, 5, 5]


# --- InfLoRA: the update is orthogonal to the old tasks' input space -----------------------

def test_inflora_update_is_orthogonal_to_old_input_space():
    learner = STRATEGIES["inflora"](context(toy_tasks()))
    learner.learn(0)
    old = {p: b.clone() for p, b in learner.bases.items()}
    assert all(b.shape[1] > 0 for b in old.values())
    learner.learn(1)
    for path, wrapper in lowrank_wrappers(learner.model, "task1", "inflora").items():
        lora_a, lora_b, scale = lowrank_factors(wrapper)
        delta = scale * lora_b.detach() @ lora_a.detach()
        assert float(delta.norm()) > 0
        ratio = float((delta @ old[path]).norm() / delta.norm())
        assert ratio <= 1e-3, (path, ratio)


def test_inflora_trains_only_b():
    learner = STRATEGIES["inflora"](context(toy_tasks()))
    learner.learn(0)
    learner.learn(1)
    wrapper = lowrank_wrappers(learner.model, "task1", "inflora")
    a_rows = next(iter(wrapper.values())).lowrank()[0].detach()
    # A was designed, never trained: orthonormal rows
    assert torch.allclose(a_rows @ a_rows.T, torch.eye(a_rows.shape[0]), atol=1e-4)


def test_extend_basis_keeps_the_energy_and_the_limit():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 3, generator=gen) @ torch.randn(3, 10, generator=gen)  # rank 3
    basis = extend_basis(None, inputs, 0.999, limit=10)
    assert basis.shape == (10, 3)
    assert float(project_out(inputs, basis).norm() / inputs.norm()) < 0.05
    assert extend_basis(None, inputs, 0.999, limit=2).shape[1] == 2


# --- O-LoRA: the orthogonality term is normalised ------------------------------------------

class _Fake:
    def __init__(self, a: torch.Tensor) -> None:
        self.a = a

    def lowrank(self):
        return self.a, None, 1.0


def test_olora_orthogonality_is_a_mean_squared_cosine_in_0_1():
    eye = torch.eye(8)
    same = orthogonality({"x": _Fake(eye[:2] * 50)}, [{"x": _Fake(eye[:2])}])
    apart = orthogonality({"x": _Fake(eye[:2])}, [{"x": _Fake(eye[4:6] * 1e-3)}])
    assert float(apart) == 0.0
    assert float(same) == pytest.approx(0.5)  # diag cosines 1, off-diagonal 0: mean 2/4
    wide = orthogonality({"x": _Fake(torch.ones(16, 8))}, [{"x": _Fake(torch.ones(4, 8))}])
    assert float(wide) == pytest.approx(1.0)  # does not grow with the rank


def test_olora_loss_lowers_the_overlap_with_earlier_adapters():
    result = run_continual(toy_tasks(), "o-lora", encoder=encoder(), steps=20, lr=5e-3,
                           options={"ortho_weight": 10.0})
    start, end = result.report["orthogonality_start"], result.report["orthogonality_end"]
    assert all(e < s for s, e in zip(start, end))


# --- HiDe: task identity from frozen features ----------------------------------------------

def test_hide_infers_the_task_on_a_separable_toy():
    tasks = toy_tasks()
    learner = Hide(context(tasks))
    for t in range(3):
        learner.learn(t)
    for i, task in enumerate(tasks):
        test = encode_task(task, 2 * i, None, 16)[1]
        inferred = learner.infer_task(test, seen=2)
        assert float((inferred == i).float().mean()) >= 0.95


# --- specs and errors ----------------------------------------------------------------------

def test_bad_strategy_and_specs_are_config_errors():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        run_continual(toy_tasks(), "ewc", encoder=encoder())
    with pytest.raises(ConfigError, match="at least 2"):
        task_specs("rotten-tomatoes")
    with pytest.raises(ConfigError, match="distinct"):
        task_specs(["a.csv", "a.csv"])
    assert task_specs("bbc-classes")[2] == "bbc-news:tech"


def test_class_split_of_a_user_file(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"text": f"text {i}", "label": ["x", "y", "z"][i % 3]} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = parse_task(f"{path}:z+x")
    assert task.label_names == ("z", "x")
    assert {e["label"] for e in task.train + task.test} == {0, 1}
    with pytest.raises(ConfigError, match="no class 'w'"):
        parse_task(f"{path}:w")


def test_a_recipe_is_the_run_description_and_loose_keywords_still_work():
    """`recipe=` (the sections: method and fields, model, train) runs the same sequence as the
    loose keywords of earlier releases, which now warn; the recipe's method fields reach the
    adapters."""
    from dataclasses import replace

    from petkit.continual.strategy import DEFAULT_TRAIN, default_recipe

    recipe = replace(default_recipe(), method={"name": "lora", "r": 4},
                     train=DEFAULT_TRAIN.replace(max_steps=8, lr=5e-3))
    new = run_continual(toy_tasks(2), "sequential", encoder=encoder(), recipe=recipe)
    with pytest.warns(DeprecationWarning, match="train section"):
        old = run_continual(toy_tasks(2), "sequential", encoder=encoder(), steps=8, lr=5e-3,
                            method_options={"r": 4})
    assert new.matrix == old.matrix and new.metrics == old.metrics
    with pytest.raises(ConfigError, match="model.quantize"):
        run_continual(toy_tasks(2), "sequential", encoder=encoder(),
                      recipe=replace(recipe, model=replace(recipe.model, quantize="nf4")))
