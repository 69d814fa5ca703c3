"""`petkit train --resume` continues exactly the run in the folder, or refuses before any model
loads (app/run_folder.py `resume_recipe`); a user's run is never replaced by following the advice
petkit prints."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml

import petkit.app.pipeline as pipeline
from petkit.app.run_folder import resume_recipe
from petkit.cli import main
from petkit.core.errors import ConfigError

WORDS = {"good": ["fine film", "lovely cast", "great fun", "superb plot"],
         "bad": ["dull film", "weak cast", "no fun", "awful plot"]}


def user_csv(path: Path, n: int = 24) -> Path:
    """A small CSV with the user's own column names (review / verdict)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        for i in range(n):
            label = "good" if i % 2 else "bad"
            writer.writerow([f"{WORDS[label][i % 4]} #{i}", label])
    return path


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail loudly: a refusal must come before it."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load_model", refuse)


def fake_run(folder: Path, steps: tuple[int, ...] = (), data: str = "tweets.csv") -> Path:
    """A run folder as `petkit train` leaves it (recipe, adapter, checkpoints)."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter.safetensors").write_bytes(b"user's adapter")
    recipe = {"model": {"name": "minilm-l6"}, "data": {"name": data, "text_column": "review",
                                                        "label_column": "verdict"},
              "train": {"max_steps": 4, "output_dir": str(folder)}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for step in steps:
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (folder / "checkpoints" / f"step-{step}" / "trainer.json").write_text("{}")
    return folder


def test_resume_without_checkpoints_refuses_and_says_what_to_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"has no checkpoint to continue from \(the run finished"
                                          r".*petkit train --recipe .*recipe.yaml --output"):
        resume_recipe(run, {}, [])
    with pytest.raises(ConfigError, match="does not exist, so there is nothing to continue"):
        resume_recipe(tmp_path / "absent", {}, [])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"holds no run \(no recipe.yaml\)"):
        resume_recipe(tmp_path / "plain", {}, [])


def test_resume_reads_the_folders_recipe_not_the_defaults(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", (2,))
    recipe = resume_recipe(run, {}, [])
    assert recipe.data.name == "tweets.csv" and recipe.data.text_column == "review"
    assert recipe.model.name == "minilm-l6" and recipe.train.max_steps == 4
    assert recipe.train.resume and not recipe.train.resume_override
    # where it runs may change freely; what it computes may not
    assert resume_recipe(run, {"train.device": "cpu", "train.progress": "false"}, []).train.device == "cpu"
    for change, field in [({"data.name": "other.csv"}, "data.name"),
                          ({"train.max_steps": "1"}, "train.max_steps"),
                          ({"method.r": "16"}, "method.r"),
                          ({"train.stepper.beta1": "0.8"}, "train.stepper.beta1")]:
        with pytest.raises(ConfigError, match=rf"would change {field} .*--resume-override={field}"):
            resume_recipe(run, change, [])
    allowed = resume_recipe(run, {"train.max_steps": "8"}, ["train.max_steps"])
    assert allowed.train.max_steps == 8 and allowed.train.resume_override


def test_cli_resume_refusals_come_before_any_model_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    no_model_load(monkeypatch)
    run = fake_run(tmp_path / "run", (2,))
    before = digests(run)
    cases = [(["--steps", "1"], "would change --steps 4 -> 1"),
             (["--data", "other.csv"], "would change --data"),
             (["--data", "bbc-news"], "--text-column='review' names a column of your own"),
             (["--recipe", "default"], "drop --recipe"),
             (["--resume-override", "stepz"], "neither a flag name")]
    for extra, message in cases:
        started = time.perf_counter()
        assert main(["train", "--resume", "--output", str(run), *extra]) == 2
        assert time.perf_counter() - started < 5
        assert message in capsys.readouterr().err
    assert main(["train", "--resume-override", "steps", "--output", str(tmp_path / "new")]) == 2
    assert "only applies with --resume" in capsys.readouterr().err
    assert digests(run) == before


def test_output_naming_a_file_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    no_model_load(monkeypatch)
    (tmp_path / "afile").write_text("mine")
    for target in ("afile", "afile/sub"):
        assert main(["train", "--steps", "1", "--output", str(tmp_path / target)]) == 2
        assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.slow
def test_the_first_hour_sequence_keeps_the_users_adapter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """#24 point 1: a run on the user's CSV with no checkpoints; petkit's advice followed with
    `--resume --steps 1` replaced it. Now: refused, and every file byte-identical."""
    monkeypatch.chdir(tmp_path)
    data = user_csv(tmp_path / "reviews.csv")
    common = ["--model", "minilm-l6", "--data", str(data), "--text-column", "review",
              "--label-column", "verdict", "--batch-size", "4", "--train.progress=false"]
    assert main(["train", *common, "--steps", "2", "--output", "runs/csv"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "runs" / "csv" / "results.json").read_text())
    assert set(results["before"]) == set(results["after"]) == {"loss", "accuracy"}
    assert results["command"][:2] == ["petkit", "train"] and results["steps"] == 2
    assert results["versions"]["torch"] and results["seconds"]["total_s"] > 0
    before = digests(tmp_path / "runs" / "csv")
    assert main(["train", "--output", "runs/csv", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume continues it" not in err  # nothing to resume
    assert main(["train", "--resume", "--output", "runs/csv", "--steps", "1"]) == 2
    assert main(["train", "--resume", "--output", "runs/csv"]) == 2
    assert "no checkpoint to continue from" in capsys.readouterr().err
    assert digests(tmp_path / "runs" / "csv") == before
    # A run with checkpoints resumes on its own data and recipe, without repeating any flag.
    assert main(["train", *common, "--steps", "2", "--output", "runs/ck",
                 "--train.save_every=1"]) == 0
    assert main(["train", "--resume", "--output", "runs/ck",
                 "--resume-override", "steps", "--steps", "3"]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "ck" / "recipe.yaml").read_text())
    assert saved["data"]["name"] == str(data) and saved["data"]["text_column"] == "review"
    assert saved["train"]["max_steps"] == 3
    assert (tmp_path / "runs" / "ck" / "checkpoints" / "step-3").is_dir()
