"""benchmarks/default_recipe.py: the held-out search trains on exactly the test grid's examples and
scores on pool examples outside them; the carved search keeps its split; the grids load."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from petkit.benchmark.spec import load_spec
from petkit.benchmark.tasks import cell_data

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("default_recipe", ROOT / "benchmarks" / "default_recipe.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


def pool_task(n: int) -> SimpleNamespace:
    """The parts of a LoadedTask that cell_data reads; encoding keeps the example."""
    pool = [{"text": f"t{i}", "label": i % 2} for i in range(n)]
    return SimpleNamespace(pool=pool, encode=list, spec=SimpleNamespace(data="toy"))


def texts(examples) -> list[str]:
    return [e["text"] for e in examples]


def test_held_out_validation_is_outside_the_training_examples_of_the_test_grid():
    loaded = pool_task(1000)
    for seed in (0, 1):
        data = recipe.search_data(loaded, 480, seed, 0.0, None)
        assert texts(data.train) == texts(cell_data(loaded, 480, seed, 0, None).train)  # what the test grid trains on
        assert len(data.validation) == recipe.HELD_OUT
        assert not set(texts(data.validation)) & set(texts(data.train))
    assert texts(recipe.search_data(loaded, 480, 0, 0.0, None).validation) != \
        texts(recipe.search_data(loaded, 480, 1, 0.0, None).validation)  # drawn with the seed


def test_carved_validation_is_the_harness_split_of_the_first_search():
    loaded = pool_task(1000)
    data = recipe.search_data(loaded, 480, 0, 0.2, 96)
    reference = cell_data(loaded, 480, 0, 0.2, 96)
    assert texts(data.train) == texts(reference.train) and texts(data.validation) == texts(reference.validation)
    assert len(data.train) == 384 and len(data.validation) == 96


def grid(name: str):
    return load_spec(str(ROOT / "benchmarks" / name))


def test_the_default_recipe_grids_share_todays_budget_and_tasks():
    for name in ("default_recipe_search.yaml", "default_recipe_heldout.yaml", "default_recipe_heldout_seed1.yaml",
                 "default_recipe_test.yaml", "default_recipe_test_candidate.yaml", "default_recipe_test_candidate2.yaml"):
        spec = grid(name)
        assert {t.name for t in spec.tasks} == {"rotten-tomatoes", "bbc-news"}
        assert spec.train["max_steps"] == 60 and spec.train["batch_size"] == 8 and tuple(spec.sizes) == (480,)
    assert "default-qv-r8" in {a.name for a in grid("default_recipe_heldout.yaml").arms}
    assert grid("default_recipe_heldout.yaml").validation_fraction == 0


def test_each_candidate_runs_the_test_grid_with_the_searched_arm():
    test, searched = grid("default_recipe_test.yaml"), {a.name: a for a in grid("default_recipe_heldout.yaml").arms}
    for name in ("default_recipe_test_candidate.yaml", "default_recipe_test_candidate2.yaml"):
        candidate = grid(name)
        assert (candidate.train, candidate.tasks, candidate.seeds, candidate.validation_fraction) == \
            (test.train, test.tasks, test.seeds, test.validation_fraction)
        (arm,) = candidate.arms
        assert arm == searched[arm.name]


def test_the_second_validation_seed_reruns_searched_arms_with_todays_default():
    searched = {a.name: a for a in grid("default_recipe_heldout.yaml").arms}
    second = grid("default_recipe_heldout_seed1.yaml")
    assert tuple(second.seeds) == (1,) and second.train == grid("default_recipe_heldout.yaml").train
    assert all(arm == searched[arm.name] for arm in second.arms)
    assert "default-qv-r8" in {a.name for a in second.arms}


def cells(arm: str, task: str, accs: list[float], cpu: float) -> list[dict]:
    return [{"arm": arm, "task": task, "seed": str(s), "test_metric": str(a), "cpu_s_per_step": str(cpu)}
            for s, a in enumerate(accs)]


def test_each_arm_is_compared_with_peft_and_todays_default_per_task():
    rows = (cells("default-qv-r8", "rt", [0.80, 0.82, 0.84], 2.0) + cells("peft-default", "rt", [0.80, 0.80, 0.80], 2.0)
            + cells("cand", "rt", [0.85, 0.85, 0.85], 2.5))
    lines = recipe._against(rows, "peft-default").splitlines()
    assert lines == ["default-qv-r8 - peft-default on rt: +2.0 points, CPU s/step x1.00 (3 and 3 seeds)",
                     "cand - peft-default on rt: +5.0 points, CPU s/step x1.25 (3 and 3 seeds)"]
    assert recipe._against(rows, "default-qv-r8", skip=("peft-default",)) == \
        "cand - default-qv-r8 on rt: +3.0 points, CPU s/step x1.25 (3 and 3 seeds)"


def test_rounds_5_to_11_copy_round_4s_cells_only_for_the_same_arms_split_and_budget():
    import json

    round4 = grid("default_recipe_heldout_r4.yaml")
    earlier = {a.name: a for a in round4.arms}
    for name in ("default_recipe_heldout_r5.yaml", "default_recipe_heldout_r6.yaml", "default_recipe_heldout_r7.yaml",
                 "default_recipe_heldout_r8.yaml", "default_recipe_heldout_r9.yaml", "default_recipe_heldout_r10.yaml",
                 "default_recipe_heldout_r11.yaml"):
        spec = grid(name)
        assert tuple(spec.seeds) == (0, 1) and spec.train == round4.train and spec.tasks == round4.tasks
        assert (spec.validation_fraction, spec.validation_max) == (0, 1200)
        arms = {a.name: a for a in spec.arms}
        assert {"default-qv-r8", "ia3-lr1e-2"} <= set(arms)
        copied = [json.loads(line) for line in (ROOT / "docs" / f"{Path(name).stem}.jsonl").read_text().splitlines()]
        for record in (r for r in copied if "copied_from" in r):
            assert arms[record["arm"]] == earlier[record["arm"]] and record["n_val"] == 1200


def test_round_6s_test_grid_is_round_4s_with_the_searched_arm():
    test, candidate = grid("default_recipe_test_candidate3.yaml"), grid("default_recipe_test_candidate4.yaml")
    assert (candidate.train, candidate.tasks, candidate.seeds, candidate.validation_fraction) == \
        (test.train, test.tasks, test.seeds, test.validation_fraction)
    (arm,) = candidate.arms
    assert arm == {a.name: a for a in grid("default_recipe_heldout_r6.yaml").arms}[arm.name]


def test_search_runs_only_the_asked_task_arm_and_seed(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(recipe, "ROOT", tmp_path)
    monkeypatch.setattr(recipe, "load", lambda task: task.name)
    monkeypatch.setattr(recipe, "validation_cell", lambda cell, spec, loaded: ran.append(cell.key) or {"key": cell.key})
    (tmp_path / "docs").mkdir()
    recipe.search(str(ROOT / "benchmarks" / "default_recipe_heldout_r5.yaml"), "1/1", "bbc-news", "ia3-lr2e-2", "1")
    assert ran == ["bbc-news/ia3-lr2e-2/n=480/seed=1"]


def test_cost_trains_each_arm_on_its_training_examples_only_and_reports_ratios(monkeypatch, capsys):
    seen = []

    def fake_train(model, data, config, **kwargs):  # some CPU time per step, as a real step has
        seen.append((len(data), config.max_steps, config.batch_size, kwargs.get("eval_data")))
        sum(range(20_000 * config.max_steps))

    monkeypatch.setattr(recipe, "train", fake_train)
    path = ROOT / "benchmarks" / "default_recipe_heldout_r10.yaml"
    recipe.cost(str(path), "rotten-tomatoes", "3")
    arms = [a.name for a in grid(path.name).arms]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"rotten-tomatoes {arm}" for arm in arms]
    assert lines[0].endswith("x1.00 the first arm's") and "batch 14," in lines[arms.index("ia3-top10-b14")]
    # one warm-up step, then the measured steps; the 480 training examples, no evaluation data
    assert [steps for _, steps, _, _ in seen] == [1, 3] * len(arms)
    assert all(n == 480 and evaluation is None for n, _, _, evaluation in seen)
    assert [batch for _, _, batch, _ in seen[::2]] == [8, 8, 14, 12, 8]  # each arm's own batch size
