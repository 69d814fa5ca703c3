"""The benchmark harness on an image task: mnist-5k on a tiny random ViT as a few-shot grid
(methods x shots x seeds) with linear probing and full fine-tuning as baselines, and a PVP arm
that starts from a delta pre-trained on other classes; the shipped vision grid files load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import petkit as pk
import petkit.benchmark as bench
from petkit.benchmark.arms import start_from, transferable_state
from petkit.core.errors import ConfigError
from petkit.models.vision import tiny_vision_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("vit") / "vit"
    tiny_vision_model(num_labels=3, image_size=16).save_pretrained(folder)
    return str(folder)


def grid(vit: str, **changes: object) -> dict:
    spec = {"tasks": [{"name": "digits", "model": vit, "data": "mnist-5k", "image_size": 16,
                       "classes": [5, 6, 7], "test_size": 12}],
            "methods": [{"name": "vpt", "arm": "vpt-deep", "deep": True, "num_virtual_tokens": 2},
                        {"name": "vpt", "arm": "pvp", "deep": True, "num_virtual_tokens": 2,
                         "pretrain": {"classes": [0, 1, 2], "train": {"max_steps": 3}}}],
            "baselines": {"linear-probe": True, "full": {"lr": 1e-4}},
            "seeds": [0, 1], "shots": [1, 2], "validation": {"fraction": 0},
            "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 4}, "threads": 1}
    return {**spec, **changes}


def test_vision_grid_runs_methods_by_shots_by_seeds_with_baselines(vit: str, tmp_path: Path) -> None:
    report = bench.run(grid(vit), tmp_path / "run", progress=False, echo=lambda _: None)
    assert not report.failed, report.failed
    cells = {(r["arm"], r["size"], r["seed"]): r for r in report.records}
    assert set(cells) == {(a, k, s) for a in ("vpt-deep", "pvp", "linear-probe", "full")
                          for k in ("1", "2") for s in (0, 1)}
    assert all(r["unit"] == "k" and r["n_val"] == 0 and r["n_test"] == 12 for r in cells.values())
    assert cells[("pvp", "2", 0)]["n_train"] == 3 * 2  # shots x kept classes
    assert cells[("linear-probe", "1", 0)]["trainable_params"] == (2 * 32 + 1) * 3
    assert cells[("full", "1", 0)]["trainable_pct"] == pytest.approx(100.0)
    # PVP starts from the delta trained on digits 0-2 (once, cached), scratch from random tokens.
    sources = list((tmp_path / "run" / "pretrain").glob("pvp-*.json"))
    assert len(sources) == 1 and json.loads(sources[0].read_text())["steps"] == 3
    assert cells[("pvp", "1", 0)]["test_loss"] != cells[("vpt-deep", "1", 0)]["test_loss"]
    table = report.markdown.read_text()
    assert "accuracy k=1" in table and "| linear-probe |" in table
    assert "No validation split: the last step is kept" in table
    assert (tmp_path / "run" / "plots" / "digits-metric-vs-size.png").is_file()
    again = bench.run(grid(vit), tmp_path / "run", progress=False, echo=lambda _: None)
    assert [r["finished"] for r in again.records] == [r["finished"] for r in report.records]


def test_start_from_copies_everything_but_the_head() -> None:
    source = tiny_vision_model(num_labels=3)
    pk.attach(source, pk.make_config("vpt", deep=True, num_virtual_tokens=2,
                                     modules_to_save=["classifier"]))
    for p in pk.trainable_parameters(source).values():
        torch.nn.init.normal_(p)
    tensors = transferable_state(source, ("classifier",))
    assert tensors and not any(k.startswith("classifier.") for k in tensors)
    target = tiny_vision_model(num_labels=5, seed=1)
    pk.attach(target, pk.make_config("vpt", deep=True, num_virtual_tokens=2,
                                     modules_to_save=["classifier"]))
    start_from(target, tensors)
    state = pk.trainable_parameters(target)
    for key, value in tensors.items():
        torch.testing.assert_close(state[key], value)
    wider = tiny_vision_model(num_labels=3)
    pk.attach(wider, pk.make_config("vpt", deep=True, num_virtual_tokens=3))
    with pytest.raises(ConfigError, match="has shape"):
        start_from(wider, tensors)


@pytest.mark.parametrize("change, needle", [
    ({"sizes": [8]}, "sizes .* or shots"),
    ({"shots": [0]}, "shots must be"),
    ({"validation": {"fraction": 1}}, r"fraction must be in \[0, 1\)"),
    ({"baselines": {"probe": True}}, "unknown key"),
])
def test_vision_spec_errors_name_the_field(vit: str, change: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        bench.spec_from_dict(grid(vit, **change))


def test_task_and_pretrain_errors(vit: str) -> None:
    bad_classes = grid(vit, tasks=[{"model": vit, "data": "mnist-5k", "classes": [5]}])
    with pytest.raises(ConfigError, match="classes must be a list of >= 2"):
        bench.spec_from_dict(bad_classes)
    methods = [{"name": "vpt", "pretrain": {"train": {"max_steps": 2}}}]
    with pytest.raises(ConfigError, match="pretrain.classes"):
        bench.spec_from_dict(grid(vit, methods=methods))


def test_shipped_vision_grid_files_load() -> None:
    files = sorted((ROOT / "docs" / "vision").glob("*.yaml"))
    assert files, "the documented vision grid files are missing"
    for path in files:
        spec = bench.load_spec(path)
        assert len(spec.seeds) >= 3 and spec.cells()
        # the grids carry both baselines; the rate checks (rates*.yaml) only the goal's two arms
        baselines = {"full"} if path.stem.startswith("rates") else {"full", "linear-probe"}
        assert {a.kind for a in spec.arms} >= baselines | {"petkit"}, path.name
