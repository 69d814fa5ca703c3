"""`petkit train` never writes over an earlier run unless asked (app/run_folder.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from petkit.app.recipe import Recipe, load_recipe
from petkit.app.run_folder import choose_output, earlier_run
from petkit.cli import main
from petkit.core.errors import ConfigError


def finished_run(folder: Path, steps: tuple[int, ...] = ()) -> Path:
    """A folder as a run leaves it: recipe, adapter, complete checkpoints `step-N`."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "recipe.yaml").write_text("model: {}\n")
    for step in steps:
        ckpt = folder / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer.json").write_text("{}")
    return folder


def recipe(output: Path | None, **train: Any) -> Recipe:
    """The default recipe writing to `output` (None: its own folder, runs/default)."""
    base = load_recipe("default")
    return dataclasses.replace(base, train=base.train.replace(
        output_dir=str(output or base.train.output_dir), **train))


def test_what_an_earlier_run_left_is_named(tmp_path: Path) -> None:
    assert earlier_run(tmp_path / "absent") is None
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not a run")
    assert earlier_run(tmp_path / "notes") is None
    assert earlier_run(finished_run(tmp_path / "a", (20, 40))) == \
        "an adapter, checkpoints up to step-40"
    crashed = tmp_path / "b"
    (crashed / "checkpoints" / "step-7").mkdir(parents=True)
    (crashed / "checkpoints" / "step-7" / "trainer.json").write_text("{}")
    (crashed / "checkpoints" / ".step-8.petkit-tmp-x").mkdir()  # a save the crash cut short
    assert earlier_run(crashed) == "checkpoints up to step-7"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "recipe.yaml").write_text("")
    assert "saved nothing yet" in earlier_run(tmp_path / "c")


def test_a_named_folder_holding_a_run_is_refused(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run", (40,))
    with pytest.raises(ConfigError, match=r"run already holds a run \(an adapter, checkpoints up "
                                          r"to step-40\); --resume continues it, --overwrite"):
        choose_output(recipe(run), overwrite=False, echo=print)
    assert choose_output(recipe(run), overwrite=True, echo=print) == run
    assert choose_output(recipe(run, resume=True), overwrite=False, echo=print) == run
    fresh = tmp_path / "fresh"
    assert choose_output(recipe(fresh), overwrite=False, echo=print) == fresh


def test_the_default_folder_moves_on_and_says_so(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    assert choose_output(recipe(None), False, lines.append) == Path("runs/default")
    finished_run(tmp_path / "runs" / "default")
    finished_run(tmp_path / "runs" / "default-2")
    assert choose_output(recipe(None), False, lines.append) == Path("runs/default-3")
    assert lines == ["runs/default holds an earlier run (an adapter); this run writes to "
                     "runs/default-3 (--output DIR names the folder; --overwrite replaces the "
                     "earlier run)"]
    assert choose_output(recipe(None), True, lines.append) == Path("runs/default")
    assert choose_output(recipe(None, resume=True), False, lines.append) == Path("runs/default")


def test_cli_refuses_before_loading_a_model(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = finished_run(tmp_path / "run", (3,))
    started = time.perf_counter()
    assert main(["train", "--steps", "3", "--output", str(run)]) == 2
    assert time.perf_counter() - started < 5  # no model was loaded
    err = capsys.readouterr().err
    assert "already holds a run (an adapter, checkpoints up to step-3)" in err
    assert (run / "checkpoints" / "step-3" / "trainer.json").is_file()  # nothing deleted
