"""Every subcommand takes every section's fields as `--section.field` flags, or says in one table
(`cli_sections.NOT_APPLICABLE`) why a section does not apply; `--help` lists them per section;
the fields the CLI reads from the sections' source are the dataclasses' own; and a field given to
a command reaches the config that command runs with."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from petkit import cli_sections as cs
from petkit.app.recipe import DataSpec, ModelSpec, Recipe
from petkit.cli import _recipe, _split_dotted, build_parser, main
from petkit.cli_io import UsageError
from petkit.core.errors import ConfigError
from petkit.core.registry import METHODS
from petkit.fed.config import FedConfig
from petkit.training.config import TrainConfig
from petkit.training.dp import DPConfig
from petkit.training.objectives_config import ObjectiveConfig
from petkit.training.runtime import RuntimeConfig
from petkit.training.steppers.base import registered_configs
from petkit.training.steppers.ist import IstConfig
from test_sections import NEEDS, SECTION_FIELDS, _sample

CLASSES = {"model": ModelSpec, "data": DataSpec, "train": TrainConfig, "runtime": RuntimeConfig,
           "train.objective": ObjectiveConfig, "train.ist": IstConfig, "train.dp": DPConfig,
           "fed": FedConfig}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the parser's required options (and for a required one-of group)."""
    out = []
    for action in parser._actions:
        if action.required and action.option_strings:
            out += [action.option_strings[0], "x"]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            out += [group._group_actions[0].option_strings[0], "x"]
    return out


def _builtin_steppers() -> dict[str, type]:
    return {n: c for n, c in registered_configs().items() if c.__module__.startswith("petkit.")}


def _keys(section: str) -> list[str]:
    """Every `section.field` of a section, walked from the dataclasses themselves (the method
    section: every registered method's config fields; train: its nested sections too)."""
    if section == "method":
        return sorted({f"method.{f.name}" for info in METHODS.values()
                       for f in dataclasses.fields(info.config_cls)})
    keys = [f"{section}.{f.name}" for f in dataclasses.fields(CLASSES[section])
            if not (section == "train" and f.name in cs.TRAIN_NESTED)]
    if section == "train":
        keys += [f"train.stepper.{f.name}" for cls in _builtin_steppers().values()
                 for f in dataclasses.fields(cls)]
        keys += [f"{sub}.{f.name}" for sub in ("train.objective", "train.ist", "train.dp")
                 for f in dataclasses.fields(CLASSES[sub])]
    return keys


def test_fields_read_from_the_source_are_the_dataclasses_fields():
    """What --help shows (read with ast, no torch) is each class's fields, help and choices."""
    for section, cls in CLASSES.items():
        read = {f.name: f for f in cs.class_fields(*cs.SOURCES[section])}
        real = {f.name: f for f in dataclasses.fields(cls)}
        assert list(read) == list(real), section
        for name, f in real.items():
            if "help" in f.metadata:
                assert read[name].help == f.metadata["help"], (section, name)
            assert read[name].choices == tuple(map(str, f.metadata.get("choices", ())))
            if f.default is not dataclasses.MISSING:
                assert read[name].default == cs._spell(f.default), (section, name)
    for cls in (TrainConfig, RuntimeConfig):  # the two main sections: help on every field
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
    found = {name: (path, cls) for path, cls, name, _ in cs.stepper_classes()}
    assert {n: c.__name__ for n, c in _builtin_steppers().items()} == {
        n: cls for n, (_, cls) in found.items()}
    for name, cls in _builtin_steppers().items():
        assert [f.name for f in dataclasses.fields(cls)] == [
            f.name for f in cs.class_fields(*found[name])]


def test_the_table_of_exceptions_names_real_commands_and_sections():
    commands = _subcommands()
    assert set(cs.NOT_APPLICABLE) <= set(commands) and set(cs.EXTRA) <= set(commands)
    for command, skipped in cs.NOT_APPLICABLE.items():
        assert set(skipped) <= set(cs.RECIPE) and all(len(r) > 15 for r in skipped.values())


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_subcommand_takes_every_section_field_or_says_why_not(command):
    parser = _subcommands()[command]
    required = _required(parser)
    for section in (*cs.RECIPE, *cs.EXTRA.get(command, ())):
        reason = cs.NOT_APPLICABLE.get(command, {}).get(section)
        if reason:
            with pytest.raises(UsageError, match=f"petkit {command} takes no --{section}"):
                cs.check_applies(command, {f"{section}.anything": "1"})
            continue
        for key in _keys(section):
            args, extra = parser.parse_known_args([*required, f"--{key}=7"])
            assert {**cs.values(args), **_split_dotted(extra)} == {key: "7"}, (command, key)
            if section != "method":  # declared flags (a method's fields pass through)
                assert extra == [] and cs.values(args) == {key: "7"}, (command, key)


def test_help_lists_the_section_flags_with_types_choices_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("section runtime (RuntimeConfig; recipe key runtime:)",
                   "--runtime.precision {auto,fp32,bf16}", "--train.schedule {linear,cosine,constant}",
                   "--train.lr FLOAT learning rate", "--runtime.loss_chunk INT|none",
                   "section train.stepper", "--train.stepper.eps FLOAT zo (mezo, zo-adam)",
                   "section method", "--data.max_length INT"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--runtime.device" in text and "--train.lr" not in text
    assert "sections not taken here:" in text and "--train.*: it trains nothing" in text
    with pytest.raises(SystemExit):  # each flag names the command's own short flag for it
        main(["fed", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert "(default: 100; also --local-steps)" in text and "--fed.clients INT number of clients" in text
    assert "--fed.seed INT FedConfig.seed (default: 0; also --seed)" in text
    assert "--train.seed INT seed of data order and initialisation (default: 0) " in text


def test_a_section_that_does_not_apply_is_one_red_line(capsys):
    assert main(["bench", "quick", "--data.max_length=9"]) == 2
    err = capsys.readouterr().err
    assert "petkit bench takes no --data.* settings" in err and "tasks:" in err
    assert main(["methods", "--train.lr=1e-3"]) == 2


# --- the value reaches what the command runs with ------------------------------------------

def _bench(dotted: dict[str, str]) -> Recipe:
    from petkit.benchmark.spec import spec_from_dict, with_overrides

    spec = spec_from_dict({"tasks": [{"name": "t", "model": "m", "data": "d"}],
                           "methods": ["lora"], "seeds": [0], "sizes": [8]})
    cell = spec.cells()[0]
    return Recipe(train=with_overrides(spec, dotted).train_config(cell))


def _fed(dotted: dict[str, str]) -> Recipe:
    pytest.importorskip("flwr")
    from petkit.fed.cli import fed_recipe

    args, _ = build_parser().parse_known_args(["fed"])
    return fed_recipe(args, dotted).recipe


def _continual(dotted: dict[str, str]) -> Recipe:
    from petkit.continual.cli import continual_recipe

    return continual_recipe({}, dotted)


def _eval(dotted: dict[str, str]) -> Recipe:
    args, _ = build_parser().parse_known_args(["eval", "--adapter", "a"])
    return _recipe(args, dotted)


RESOLVE = {"eval": _eval, "bench": _bench, "fed": _fed, "continual": _continual}


@pytest.mark.parametrize("command", sorted(RESOLVE))
@pytest.mark.parametrize("section,field", SECTION_FIELDS,
                         ids=[f"{s}.{f.name}" for s, f in SECTION_FIELDS])
def test_every_train_and_runtime_field_reaches_the_commands_run(command, section, field):
    """(`petkit train`: tests/test_sections.py; merge / export / predict / inspect share eval's
    recipe path.) Bench refuses the fields it sets per cell."""
    text, want = _sample(field)
    dotted = {f"{section}.{field.name}": text, **NEEDS.get(field.name, {})}
    if command == "bench" and any(k in dotted for k in ("train.output_dir", "train.seed",
                                                        "train.resume", "train.save_every")):
        with pytest.raises(ConfigError, match="per cell"):
            _bench(dotted)
        return
    recipe = RESOLVE[command](dotted)
    holder = recipe.runtime if section == "runtime" else recipe.train
    assert getattr(holder, field.name) == want


def test_serving_commands_read_the_base_and_its_device_and_refuse_the_rest():
    from petkit.app.serving import serving_recipe

    recipe = serving_recipe("m", {"runtime.device": "cpu", "model.quantize": "nf4"}, "chat")
    assert (recipe.model.name, recipe.model.quantize, recipe.runtime.device) == ("m", "nf4", "cpu")
    for key in (f"runtime.{f}" for f in RuntimeConfig.__dataclass_fields__ if f != "device"):
        with pytest.raises(ConfigError, match=f"petkit chat reads only .*--{key} applies"):
            serving_recipe("m", {key: "1"}, "chat")


def test_a_new_section_field_shows_in_help_without_importing_torch(tmp_path):
    """A field added to RuntimeConfig (as another part of petkit may) is a flag of every command
    that takes the runtime section, listed by --help with no torch import."""
    import shutil
    from pathlib import Path

    src = Path(cs.__file__).parent
    shutil.copytree(src, tmp_path / "petkit", ignore=shutil.ignore_patterns("__pycache__"))
    runtime = tmp_path / "petkit" / "training" / "runtime.py"
    text = runtime.read_text()
    anchor = '    distributed: str = field(default="auto"'
    runtime.write_text(text.replace(anchor, '    example_switch: str = field(default="off", metadata=_help(\n'
                                    '        "an example switch", choices=("off", "on")))\n' + anchor, 1))
    code = ("import sys\nfrom petkit.cli import main\nfor cmd in ('train', 'serve', 'bench'):\n"
            "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert out.count("--runtime.example_switch {off,on}") == 3 and "an example switch" in out
    assert out.rstrip().endswith("TORCH False")
