"""A new embedded task, embedded model and method, each one module of a package outside petkit,
declared under petkit's entry-point groups: no file of petkit changes, and they reach the help
texts, the lists, the "did you mean" errors and a whole `petkit train` run
(docs/architecture.md, "How to add ...")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from petkit.core.discovery import Discovered
from petkit.core.errors import ConfigError
from petkit.data import load_task
from petkit.data.embedded import DATASETS, register_task
from petkit.data.task import Task

ROOT = Path(__file__).resolve().parent.parent

TASK = '''
from petkit.data.embedded import register_task
from petkit.data.task import Task, holdout_split

WORDS = {0: ("bad", "awful", "poor", "sad", "boring"), 1: ("good", "great", "fine", "happy", "fun")}


def load(test_fraction: float, seed: int) -> Task:
    rows = [{"text": f"a {w} film, take {i}", "label": y}
            for i in range(20) for y in (0, 1) for w in WORDS[y]]
    train, test = holdout_split(rows, round(test_fraction * len(rows)), seed)
    return Task(name="toy-sentiment", kind="classification", train=train, test=test,
                label_names=("negative", "positive"), template="Review: {text}\\nSentiment:")


register_task("toy-sentiment", "a throwaway task built in code", load, kind="classification")
'''
MODEL = '''
import os
import shutil
from pathlib import Path

from petkit.models.embedded import embedded_model_dir, register_model
from petkit.models.embedded.minilm_l6 import MINILM


def folder() -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer, built once into $TOY_MODEL_DIR."""
    target = Path(os.environ["TOY_MODEL_DIR"])
    if not (target / "config.json").is_file():
        import torch
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(target)
        source = embedded_model_dir("minilm-l6")
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            if (source / name).is_file():
                shutil.copy(source / name, target / name)
    return target


register_model("toy-bert", "a throwaway random BERT (MiniLM's tokenizer)", folder, package=MINILM)
'''
METHOD = '''
from dataclasses import dataclass

import torch
from torch import nn

from petkit.core.delta import DeltaModule, innermost, wrap
from petkit.core.registry import MethodConfig, register
from petkit.core.targets import match_targets


class Scale(DeltaModule):
    """y = base(x) * (1 + s), s = 0 at init."""

    def __init__(self, base: nn.Module, adapter_name: str) -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        self.scale = nn.Parameter(torch.zeros(inner.out_features, dtype=inner.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y * (1 + self.scale) if self.enabled else y


@register("toy-scale", family="additive", paper="a throwaway method")
@dataclass(frozen=True)
class ToyScaleConfig(MethodConfig):
    def inject(self, model: nn.Module, name: str) -> list[str]:
        paths = match_targets(model, self.targets or "all-linear")
        for path in paths:
            wrap(model, path, Scale, name)
        return paths
'''
ENTRY_POINTS = """[petkit.datasets]
toy = toyplug.data

[petkit.models]
toy = toyplug.model

[petkit.methods]
toy = toyplug.method
"""
# One interpreter runs the commands one after the other (start-up is the slow part here).
SCRIPT = """
import sys
from petkit.cli import main

for argv in ({commands}):
    print("=== " + " ".join(argv), flush=True)
    try:
        code = main(list(argv))
    except SystemExit as done:
        code = done.code
    print(f"=== exit {{code}}", flush=True)
"""


def plugin(tmp_path: Path) -> dict[str, str]:
    """A package `toyplug` with one module per entry, declared under petkit's entry-point groups
    by its own dist-info (what `pip install` of a plugin leaves); the environment that finds it."""
    root = tmp_path / "site"
    (root / "toyplug").mkdir(parents=True)
    (root / "toyplug" / "__init__.py").write_text("")
    for name, code in (("data", TASK), ("model", MODEL), ("method", METHOD)):
        (root / "toyplug" / f"{name}.py").write_text(code)
    info = root / "toyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT / "src")]),
            "TOY_MODEL_DIR": str(tmp_path / "toy-bert"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}


def run_commands(tmp_path: Path, *commands: list[str]) -> dict[str, tuple[str, str]]:
    """{command: (exit code, its output)} of `petkit` commands run in one fresh interpreter."""
    script = tmp_path / "commands.py"
    script.write_text(SCRIPT.format(commands="".join(f"{c!r}, " for c in commands)))
    proc = subprocess.run([sys.executable, str(script)], env=plugin(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, text = {}, proc.stdout + "\n" + proc.stderr
    for block in proc.stdout.split("=== ")[1:]:
        head, _, body = block.partition("\n")
        if head.startswith("exit "):
            out[last] = (head.removeprefix("exit "), out[last][1])
        else:
            last = head
            out[head] = ("", body)
    assert out, text
    return out


@pytest.mark.slow
def test_plugin_entries_reach_help_lists_and_errors(tmp_path: Path) -> None:
    out = run_commands(tmp_path, ["train", "--help"], ["methods"], ["embedded"],
                       ["train", "--data", "toy-sentimen"], ["train", "--model", "toy-bret",
                                                             "--data", "toy-sentiment"],
                       ["train", "--method", "toy-scal"])
    helptext = " ".join(out["train --help"][1].split())
    assert "toy-sentiment" in helptext and "toy-bert" in helptext
    assert "toy-scale" in out["methods"][1] and "a throwaway method" in out["methods"][1]
    listed = out["embedded"][1]
    assert "toy-sentiment" in listed and "toy-bert" in listed and "built in" in listed
    assert out["train --data toy-sentimen"][0] == "2"
    assert out["train --model toy-bret --data toy-sentiment"][0] == "2"
    assert out["train --method toy-scal"][0] == "2"


@pytest.mark.slow
def test_plugin_task_model_and_method_train_end_to_end(tmp_path: Path) -> None:
    command = ["train", "--model", "toy-bert", "--data", "toy-sentiment", "--method",
               "toy-scale", "--steps", "4", "--lr", "0.05", "--output", str(tmp_path / "run")]
    out = run_commands(tmp_path, command)
    assert out[" ".join(command)][0] == "0", out
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "toy-scale"
    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    scales = [t for k, t in tensors.items() if k.endswith("scale")]
    assert len(scales) == 2 * 6 and any(bool(t.abs().sum() > 0) for t in scales)  # it trained
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_examples"] == 40 and results["steps"] == 4  # 20% of the 200 rows
    assert 0 <= results["after"]["accuracy"] <= 1


def test_a_task_module_registers_itself_once_and_is_loadable() -> None:
    def load(test_fraction: float, seed: int) -> Task:
        return Task(name="one-row", kind="instruction", train=[{"prompt": "a", "completion": "b"}],
                    test=[{"prompt": "c", "completion": "d"}])

    register_task("one-row", "a task of this test", load, kind="instruction")
    try:
        assert load_task("one-row").test == [{"prompt": "c", "completion": "d"}]
        with pytest.raises(ConfigError, match=r"did you mean 'one-row'\?.*one-row"):
            load_task("one-rows")
        with pytest.raises(ValueError, match="task 'one-row' is registered twice"):
            register_task("one-row", "again", load, kind="instruction")
    finally:
        dict.pop(DATASETS, "one-row")


def test_lookup_names_close_and_known_entries() -> None:
    registry: Discovered[int] = Discovered("widget", builtin="petkit.core.errors",
                                            group="no.such.group")
    registry.add("spanner", 1)
    registry.add("hammer", 2)
    assert registry.lookup("hammer") == 2
    with pytest.raises(ConfigError, match=r"unknown widget 'spaner' \(did you mean 'spanner'\?\); "
                                          r"known: spanner, hammer"):
        registry.lookup("spaner")
