"""A grid task loaded once: base model, tokenizer, training pool and the sealed test subset.

The fair protocol lives here. The test subset is chosen by index only (a fixed seed, never the
cell's) and kept in a sealed `RecordedSplit`; each cell gets its own sealed view and opens it
for the final evaluation only. A cell's training data is the first `size` examples of the pool
in the seed's shuffled order (so smaller sizes are nested in larger ones), and its validation
split is carved from those examples, stratified, with the same seed. With shots, a cell's
training data is k seeded examples of each class instead.

Image tasks (`mnist-5k`, a folder of class folders) load a ViT classifier with a new head
(`models.vision`); their examples stay images and become pixels per batch (`collate`).
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.benchmark.spec import TaskSpec
from petkit.app.pipeline import load_base, load_recipe_task, resolve_task_type
from petkit.app.recipe import DataSpec, ModelSpec, Recipe
from petkit.core.errors import ConfigError
from petkit.data.sealed_split import RecordedSplit
from petkit.data import encode_classification, encode_instruction, label_token_ids
from petkit.data.images import collate_images, encode_images, few_shot, is_image_task, select_classes
from petkit.data.task import Task, holdout_split
from petkit.models import head_module_names
from petkit.models.vision import load_vision_model

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
    collate: Callable[[Examples], dict[str, torch.Tensor]] | None = None  # image tasks: pixels

    @property
    def metric(self) -> str:
        """"accuracy" (higher is better) for classification, else "loss"."""
        return "loss" if self.task_type == "instruction" else "accuracy"

    def encode(self, examples: Examples) -> Examples:
        """Token ids for this task type (the verbaliser keeps the task's template)."""
        length = self.spec.max_length
        if self.collate is not None:
            return encode_images(examples)
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


def task_recipe(spec: TaskSpec) -> Recipe:
    """The grid task as a recipe's model and data sections: the one pipeline (app.pipeline)
    reads the task and loads the model from them, as for `petkit train`."""
    return Recipe(model=ModelSpec(spec.model), data=DataSpec(
        name=spec.data, task_type=spec.task_type, max_length=spec.max_length))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sealed_test(test: Examples, spec: TaskSpec) -> RecordedSplit:
    n_test = len(test)
    size = n_test if spec.test_size is None else min(spec.test_size, n_test)
    chosen = sorted(random.Random(TEST_SEED).sample(range(n_test), size))  # by index only
    return RecordedSplit(test).view(chosen)


def _load_images(spec: TaskSpec, task: Task) -> LoadedTask:
    """A ViT classifier with a new head over the kept classes; examples stay images."""
    train, test = list(task.train), list(task.test)
    num_labels = task.num_labels
    if spec.classes is not None:
        missing = sorted(set(spec.classes) - set(range(task.num_labels)))
        if missing:
            raise ConfigError(f"task {spec.name!r}: classes {missing} are not labels of "
                              f"{spec.data!r} (0..{task.num_labels - 1})")
        classes = list(spec.classes)
        train, test = select_classes(train, classes), select_classes(test, classes)
        num_labels = len(classes)
    model = load_vision_model(spec.model, num_labels, image_size=spec.image_size)
    return LoadedTask(spec, "head", model, None, train, _sealed_test(test, spec), "", None, 0,
                      _count(model), tuple(head_module_names(model)),
                      functools.partial(collate_images, image_size=spec.image_size))


def load(spec: TaskSpec) -> LoadedTask:
    """Load the data and the model of `spec`; seal the test subset."""
    recipe = task_recipe(spec)
    task = load_recipe_task(recipe.data)
    if is_image_task(task):
        return _load_images(spec, task)
    if spec.classes is not None:
        raise ConfigError(f"task {spec.name!r}: classes applies to image tasks, not {spec.data!r}")
    task_type = resolve_task_type(recipe, task.kind)
    model, tokenizer = load_base(spec.model, task_type, task.num_labels)
    ids = label_token_ids(tokenizer, task.label_words) if task_type == "verbaliser" else None
    heads = tuple(head_module_names(model)) if task_type == "head" else ()
    return LoadedTask(spec, task_type, model, tokenizer, list(task.train),
                      _sealed_test(list(task.test), spec), task.template, ids,
                      int(tokenizer.pad_token_id), _count(model), heads)


def _chosen(loaded: LoadedTask, size: int | None, seed: int, per_class: bool) -> Examples:
    """`size` shots per class, or the first `size` of the seed's order (nested across sizes)."""
    if per_class and size is not None:
        return few_shot(loaded.pool, size, seed)
    order = list(range(len(loaded.pool)))
    random.Random(seed).shuffle(order)
    n = len(order) if size is None else size
    if n > len(order):
        raise ConfigError(f"size {n} is larger than the {len(order)} training examples of "
                          f"{loaded.spec.data!r}; use a smaller size or 'full'")
    return [loaded.pool[i] for i in order[:n]]


def cell_data(loaded: LoadedTask, size: int | None, seed: int, fraction: float,
              max_validation: int | None, per_class: bool = False) -> CellData:
    """The cell's training subset and validation carved from it (none with fraction 0)."""
    chosen = _chosen(loaded, size, seed, per_class)
    n = len(chosen)
    if fraction == 0:
        return CellData(loaded.encode(chosen), [])
    n_val = max(1, round(fraction * n))
    n_val = min(n_val, max_validation) if max_validation else n_val
    if n - n_val < 1:
        raise ConfigError(f"size {n} leaves no training examples after {n_val} for validation")
    train, validation = holdout_split(chosen, n_val, seed)
    return CellData(loaded.encode(train), loaded.encode(validation))
