"""A grid task loaded once: base model, tokenizer, training pool and the sealed test subset.

The fair protocol lives here. The test subset is chosen by index only (a fixed seed, never the
cell's) and kept in a sealed `RecordedSplit`; each cell gets its own sealed view and opens it
for the final evaluation only. A cell's training data is the first `size` examples of the pool
in the seed's shuffled order (so smaller sizes are nested in larger ones), and its validation
split is carved from those examples, stratified, with the same seed.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.benchmark.spec import TaskSpec
from petkit.app.pipeline import resolve_task_type
from petkit.app.recipe import DataSpec, ModelSpec, Recipe
from petkit.core.errors import ConfigError
from petkit.data.sealed_split import RecordedSplit
from petkit.data import encode_classification, encode_instruction, label_token_ids, load_task
from petkit.data.task import holdout_split
from petkit.models import head_module_names, load_model

Examples = list[dict[str, Any]]
TEST_SEED = 0  # the test subset is the same for every cell


@dataclass
class CellData:
    """Encoded training and validation examples of one cell."""

    train: Examples
    validation: Examples


@dataclass
class LoadedTask:
    """Everything a cell needs from its task, loaded once per grid run."""

    spec: TaskSpec
    task_type: str  # verbaliser | head | instruction
    base: nn.Module
    tokenizer: Any
    pool: Examples  # raw training examples
    test: RecordedSplit  # raw test subset, sealed
    template: str
    label_token_ids: list[int] | None
    pad_id: int
    base_params: int
    head_modules: tuple[str, ...]

    @property
    def metric(self) -> str:
        """"accuracy" (higher is better) for classification, else "loss"."""
        return "loss" if self.task_type == "instruction" else "accuracy"

    def encode(self, examples: Examples) -> Examples:
        """Token ids for this task type (the verbaliser keeps the task's template)."""
        length = self.spec.max_length
        if self.task_type == "instruction":
            return encode_instruction(examples, self.tokenizer, max_length=length)
        template = self.template if self.task_type == "verbaliser" else "{text}"
        return encode_classification(examples, self.tokenizer, max_length=length,
                                     template=template)

    def fresh_model(self, seed: int) -> nn.Module:
        """A copy of the base; a new classification head is re-drawn from `seed`."""
        model = copy.deepcopy(self.base)
        std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for path in self.head_modules:
                for module in model.get_submodule(path).modules():
                    if isinstance(module, nn.Linear):
                        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                        if module.bias is not None:
                            module.bias.zero_()
        return model


def _task_type(spec: TaskSpec, kind: str) -> str:
    recipe = Recipe(model=ModelSpec(spec.model), data=DataSpec(
        name=spec.data, task_type=spec.task_type, max_length=spec.max_length))
    return resolve_task_type(recipe, kind)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load(spec: TaskSpec) -> LoadedTask:
    """Load the data and the model of `spec`; seal the test subset."""
    task = load_task(spec.data)
    task_type = _task_type(spec, task.kind)
    num_labels = task.num_labels if task_type == "head" else None
    model, tokenizer = load_model(spec.model, task="seq-cls" if task_type == "head"
                                  else "causal-lm", num_labels=num_labels)
    ids = label_token_ids(tokenizer, task.label_words) if task_type == "verbaliser" else None
    n_test = len(task.test)
    size = n_test if spec.test_size is None else min(spec.test_size, n_test)
    chosen = sorted(random.Random(TEST_SEED).sample(range(n_test), size))  # by index only
    heads = tuple(head_module_names(model)) if task_type == "head" else ()
    return LoadedTask(spec, task_type, model, tokenizer, list(task.train),
                      RecordedSplit(task.test).view(chosen), task.template, ids,
                      int(tokenizer.pad_token_id), _count(model), heads)


def cell_data(loaded: LoadedTask, size: int | None, seed: int, fraction: float,
              max_validation: int | None) -> CellData:
    """The cell's training subset (nested across sizes) and validation carved from it."""
    order = list(range(len(loaded.pool)))
    random.Random(seed).shuffle(order)
    n = len(order) if size is None else size
    if n > len(order):
        raise ConfigError(f"size {n} is larger than the {len(order)} training examples of "
                          f"{loaded.spec.data!r}; use a smaller size or 'full'")
    chosen = [loaded.pool[i] for i in order[:n]]
    n_val = max(1, round(fraction * n))
    n_val = min(n_val, max_validation) if max_validation else n_val
    if n - n_val < 1:
        raise ConfigError(f"size {n} leaves no training examples after {n_val} for validation")
    train, validation = holdout_split(chosen, n_val, seed)
    return CellData(loaded.encode(train), loaded.encode(validation))
