"""benchmarks/peft_twins.py's table: cells of each method's run folder kept in a JSON file (a method
run again replaces its earlier cells), both arms averaged over seeds; the benchmark grids load."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("peft_twins", ROOT / "benchmarks" / "peft_twins.py")
twins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(twins)


def cell(arm: str, seed: int, acc: float, step: float, status: str = "ok") -> dict:
    return {"arm": arm, "seed": seed, "test_metric": acc, "s_per_step": step, "peak_mem_mb": 100.0,
            "trainable_params": 1234, "finished": "t", "status": status, "other": 1}


def write(folder: Path, cells: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))


def test_table_averages_seeds_and_a_new_run_replaces_a_methods_cells(tmp_path):
    saved = tmp_path / "twins.json"
    saved.write_text(json.dumps({"hra": [cell("hra", 0, 0.5, 1.0), cell("peft:hra", 0, 0.5, 2.0)],
                                 "lily": [cell("lily", 0, 0.1, 1.0), cell("peft:lily", 0, 0.9, 1.0)]}))
    write(tmp_path / "runs" / "lily", [cell("lily", 0, 0.8, 1.0), cell("peft:lily", 0, 0.8, 2.0),
                                       cell("lily", 1, 0.6, 3.0), cell("peft:lily", 1, 0.7, 2.0),
                                       cell("peft:lily", 2, 0.0, 9.0, status="failed")])
    cells = twins.collect(tmp_path / "runs", saved)
    assert json.loads(saved.read_text()) == cells and "other" not in cells["lily"][0]
    assert len(cells["lily"]) == 4 and len(cells["hra"]) == 2  # the failed cell is dropped
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in twins.table(cells).splitlines()[2:]}
    # method, trainable x2, acc petkit, acc PEFT, gap, seeds, seeds alike, s/step x2, ratio
    assert rows["lily"][3:11] == ["70.0", "75.0", "-5.0", "2", "1", "2.000", "2.000", "1.00"]
    assert rows["hra"][3:11] == ["50.0", "50.0", "+0.0", "1", "1", "1.000", "2.000", "0.50"]


def test_the_grids_of_the_side_by_side_and_the_default_recipe_load():
    from petkit.benchmark.spec import load_spec

    twins_spec = load_spec(str(ROOT / "benchmarks" / "peft_twins.yaml"))
    ours = {a.method for a in twins_spec.arms if a.kind == "petkit"}
    assert ours == {a.method for a in twins_spec.arms if a.kind == "peft"}  # every method has its twin
    assert len(twins_spec.seeds) == 3
    for name in ("default_recipe_search.yaml", "default_recipe_test.yaml"):
        spec = load_spec(str(ROOT / "benchmarks" / name))
        assert {"default-qv-r8", "peft-default"} <= {a.name for a in spec.arms}
        assert {t.name for t in spec.tasks} == {"rotten-tomatoes", "bbc-news"}
