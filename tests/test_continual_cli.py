"""`petkit continual`: flags, option parsing, and a run through the CLI on a user file."""
from __future__ import annotations

import json

import pytest

from petkit.cli import build_parser
from petkit.continual.cli import STRATEGY_NAMES, method_overrides, parse_options
from petkit.continual.run import STRATEGIES
from petkit.core.errors import ConfigError


def test_cli_names_every_strategy():
    assert STRATEGY_NAMES == tuple(STRATEGIES)


def test_parser_takes_the_continual_flags():
    args, extra = build_parser().parse_known_args(
        ["continual", "--tasks", "a.csv,b.csv", "--strategy", "hide", "--steps", "5",
         "--option", "pool=3", "--method.r=4"])
    assert (args.command, args.cl_tasks, args.cl_strategy, args.cl_steps) == (
        "continual", "a.csv,b.csv", "hide", 5)
    assert parse_options(args.cl_options) == {"pool": 3}
    assert extra == ["--method.r=4"]


def test_option_and_override_errors():
    assert parse_options(["ortho_weight=0.5", "name=x"]) == {"ortho_weight": 0.5, "name": "x"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["pool"])
    assert method_overrides({"method.r": "16"}) == {"r": 16}
    with pytest.raises(ConfigError, match="only --method.FIELD, --train.FIELD"):
        method_overrides({"data.name": "x"})
    assert method_overrides({"train.lr": "1", "method.r": "2"}) == {"r": 2}


def test_continual_takes_the_train_and_runtime_sections():
    """One default train section (lr 1e-3, 60 steps, batch 16); --train.F / --runtime.F reach it,
    the loose flags of earlier releases still apply on top."""
    from petkit.continual.cli import train_section
    from petkit.continual.strategy import DEFAULT_TRAIN, continual_train

    assert train_section({}) is DEFAULT_TRAIN
    assert (DEFAULT_TRAIN.lr, DEFAULT_TRAIN.max_steps, DEFAULT_TRAIN.batch_size) == (1e-3, 60, 16)
    train = train_section({"train.lr": "0.01", "train.max_steps": "5", "runtime.device": "cpu",
                           "train.weight_decay": "0.1", "method.r": "4"})
    assert (train.lr, train.max_steps, train.weight_decay, train.runtime.device) == \
        (0.01, 5, 0.1, "cpu")
    assert continual_train(train, lr=0.5, steps=None).lr == 0.5
    with pytest.raises(ConfigError, match="warmup"):
        train_section({"train.warmup": "3"})


def test_unknown_strategy_is_one_red_line(capsys):
    from petkit.cli import main

    code = main(["continual", "--tasks", "a.csv,b.csv", "--strategy", "ewc"])
    assert code == 2
    assert "strategy must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_a_sequence_of_user_files(tmp_path, capsys):
    from petkit.cli import main

    specs = []
    for k, words in enumerate((("good", "bad"), ("cat", "dog"))):
        path = tmp_path / f"t{k}.jsonl"
        rows = [{"text": f"this is {words[i % 2]} number {i}", "label": words[i % 2]}
                for i in range(40)]
        path.write_text("\n".join(json.dumps(r) for r in rows))
        specs.append(str(path))
    out = tmp_path / "run"
    code = main(["continual", "--tasks", ",".join(specs), "--strategy", "hide", "--steps", "3",
                 "--max-train", "16", "--max-test", "8", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "forgetting" in capsys.readouterr().out
    assert (out / "results.json").exists() and (out / "adapters" / "routing.json").exists()
    # the same command again is refused before any work, and the run is kept
    before = (out / "results.json").read_bytes()
    code = main(["continual", "--tasks", ",".join(specs), "--strategy", "hide", "--steps", "3",
                 "--max-train", "16", "--max-test", "8", "--output", str(out)])
    assert code == 2 and "already holds a run (results and adapters)" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_default_continual_folder_moves_on(tmp_path, monkeypatch, capsys):
    import argparse

    from petkit.continual import cli as continual_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "continual-hide").mkdir(parents=True)
    (tmp_path / "runs" / "continual-hide" / "results.json").write_text("{}")
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any model work: only the folder choice matters

    import importlib

    monkeypatch.setattr(importlib.import_module("petkit.continual.run"), "run_continual", fake_run)
    parser = argparse.ArgumentParser()
    continual_cli.add_arguments(parser)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        continual_cli.command(parser.parse_args(["--tasks", "bbc-classes", "--strategy", "hide"]),
                              {}, lines.append)
    assert str(seen["output_dir"]) == "runs/continual-hide-2" and seen["progress"] is True
    assert lines and "writes to runs/continual-hide-2" in lines[0]


def test_recipe_file_gives_the_sections_and_flags_go_on_top(tmp_path):
    """`--recipe FILE`: its method, model, train and runtime sections; the flags and dotted
    options apply on top; a data section is refused (the tasks come from --tasks)."""
    from petkit.continual.cli import continual_recipe

    path = tmp_path / "cl.yaml"
    path.write_text("method: {name: lora, r: 4}\nmodel: {name: minilm-l6}\n"
                    "train: {lr: 0.002, max_steps: 7, batch_size: 8}\nruntime: {device: cpu}\n")
    recipe = continual_recipe({"train.max_steps": "9"}, {"method.alpha": "8"}, str(path))
    assert recipe.method == {"name": "lora", "r": 4, "alpha": 8}
    assert (recipe.train.lr, recipe.train.max_steps, recipe.runtime.device) == (0.002, 9, "cpu")
    with pytest.raises(ConfigError, match="drop its data: section"):
        continual_recipe({}, {}, "minilm-bbc")
    args, _ = build_parser().parse_known_args(["continual", "--tasks", "a,b", "--recipe", str(path)])
    assert args.cl_recipe == str(path)
