"""Extending training takes the files docs/architecture.md names, nothing else: a throwaway
stepper in its own module (registered with its config and optional hooks) and a throwaway
TrainConfig field (one edit of training/config.py) reach recipes, the CLI's flags and a run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import petkit as pk
from petkit.app.recipe import Recipe, apply_overrides
from petkit.cli import _recipe, _split_dotted, build_parser
from petkit.core.errors import ConfigError
from petkit.models.tiny import tiny_model
from petkit.training.sections import optimizers
from petkit.training.steppers.base import registered_configs, registered_factories

SRC = Path(__file__).resolve().parents[1] / "src"

STEPPER = '''
"""A throwaway stepper: plain SGD with its own config and two optional hooks."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from petkit.training.steppers.base import StepperConfig, register_stepper


@dataclass(frozen=True)
class NudgeConfig(StepperConfig):
    NAME: ClassVar[str] = "nudge"
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("nudge-sgd",)
    scale: float = 1.0

    def __post_init__(self):
        self.require(self.scale > 0, "scale", "a number > 0", self.scale)


class Nudge:
    def __init__(self, params, config, total_steps):
        self.params, self.lr = list(params.values()), config.lr * config.stepper.scale
        self.steps, self.bound = 0, None

    def bind_model(self, model):            # BindsModel
        self.bound = type(model).__name__

    def step(self, micro_batches, loss_fn):
        loss = sum(loss_fn(b) for b in micro_batches) / len(micro_batches)
        loss.backward()
        with torch.no_grad():
            for p in self.params:
                p -= self.lr * p.grad
                p.grad = None
        self.steps += 1
        return float(loss)

    def current_lr(self):
        return self.lr

    def log_fields(self):                   # LogsFields
        return {"nudges": self.steps}

    def report(self):                       # Reports
        return {"nudge_bound_to": self.bound}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@register_stepper("nudge", config=NudgeConfig)
def make(params, config, total_steps):
    return Nudge(params, config, total_steps)
'''


@pytest.fixture(scope="module")
def nudge(tmp_path_factory):
    """The throwaway stepper, imported from a file outside the package."""
    path = tmp_path_factory.mktemp("plugin") / "nudge_stepper.py"
    path.write_text(STEPPER)
    spec = importlib.util.spec_from_file_location("nudge_stepper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    registered_configs().pop("nudge")  # the rest of the session sees the built-in steppers only
    registered_factories().pop("nudge")


def _cli(argv: list[str]) -> Recipe:
    args, extra = build_parser().parse_known_args(argv)
    return _recipe(args, _split_dotted(extra))


def test_a_stepper_in_its_own_module_reaches_configs_flags_and_a_run(nudge):
    assert "nudge-sgd" in optimizers()
    cfg = pk.TrainConfig(optimizer="nudge-sgd", stepper={"name": "nudge", "scale": 0.5},
                         max_steps=3, batch_size=2, lr=0.1, log_every=1, progress=False)
    assert isinstance(cfg.stepper, nudge.NudgeConfig) and cfg.stepper.scale == 0.5
    with pytest.raises(ConfigError, match="scale"):
        pk.TrainConfig(optimizer="nudge-sgd", stepper={"name": "nudge", "scale": -1.0})
    flags = _cli(["train", "--optimizer", "nudge-sgd", "--train.stepper.scale=2"])
    assert flags.train.stepper == nudge.NudgeConfig(scale=2.0)
    model, _ = tiny_model("llama")
    pk.attach(model, pk.LoraConfig(r=2))
    before = {k: v.detach().clone() for k, v in pk.trainable_parameters(model).items()}
    ids = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    result = pk.train(model, [{"input_ids": r, "labels": r} for r in ids], cfg)
    after = pk.trainable_parameters(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert [row["nudges"] for row in result.history] == [1, 2, 3]  # LogsFields reached the log
    assert result.report["nudge_bound_to"] == type(model).__name__  # BindsModel, Reports


FIELD = '''    throwaway_knob: int = field(default=0, metadata=_help("a knob added by a test"))
'''
CHECK = '''        _check(is_int(self.throwaway_knob) and self.throwaway_knob >= 0, "throwaway_knob",
               "an int >= 0", self.throwaway_knob)
'''
RUN = '''
import json, sys, torch, petkit as pk
from petkit.cli import _recipe, _split_dotted, build_parser
from petkit.models.tiny import tiny_model
import contextlib, io
from petkit.cli import main
helps = {}
for command in ("train", "eval", "continual", "bench", "fed", "serve"):
    with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):
        main([command, "--help"])
    helps[command] = " ".join(text.getvalue().split())
args, extra = build_parser().parse_known_args(["train", "--train.throwaway_knob=7"])
recipe = _recipe(args, _split_dotted(extra))
model, _ = tiny_model("llama")
pk.attach(model, pk.LoraConfig(r=2))
ids = torch.randint(3, 100, (2, 8))
cfg = recipe.train.replace(max_steps=1, batch_size=2, save_every=1, output_dir=sys.argv[1],
                           progress=False)
pk.train(model, [{"input_ids": r, "labels": r} for r in ids], cfg)
try:
    pk.TrainConfig(throwaway_knob=-1)
except pk.ConfigError as err:
    print(json.dumps({"knob": recipe.train.throwaway_knob, "error": str(err), "helps": helps}))
'''


@pytest.mark.slow
def test_a_train_config_field_is_one_edit_and_reaches_flags_recipes_and_the_checkpoint(tmp_path):
    """Copy the package, add one field (and its check) to training/config.py, nothing else."""
    shutil.copytree(SRC / "petkit", tmp_path / "src" / "petkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "src" / "petkit" / "training" / "config.py"
    text = config.read_text()
    edits = (("    head_lr: float | None", FIELD + "    head_lr: float | None"),
             ("    def _check_io(self) -> None:\n", "    def _check_io(self) -> None:\n" + CHECK))
    for anchor, edited in edits:
        assert anchor in text  # the edit a contributor makes, at a place that exists
        text = text.replace(anchor, edited, 1)
    config.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    out = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["knob"] == 7 and "throwaway_knob" in found["error"]
    flag = "--train.throwaway_knob INT a knob added by a test (default: 0)"
    assert all(flag in found["helps"][c] for c in ("train", "eval", "continual", "bench", "fed"))
    assert "--train.throwaway_knob" not in found["helps"]["serve"]  # serve takes no train section
    saved = next((tmp_path / "run").rglob("trainer.json"))
    assert json.loads(saved.read_text())["config"]["throwaway_knob"] == 7
