"""`run_continual` (`pk.continual`): learn tasks in order, score every seen task after each one.

    result = pk.continual("bbc-classes", "hide", output_dir="runs/cl-hide")
    result.matrix[t][i]       accuracy on task i after task t, the task id NOT given
    result.matrix_task_aware  the same with the task id given (argmax within task i's classes)
    result.metrics            average accuracy, forgetting, backward transfer (of `matrix`)

The output folder holds results.json, accuracy.png (each task's accuracy over time) and
adapters/: one petkit adapter folder per task or pool slot, routing.json (what to rebuild) and
routing.safetensors (prototypes, selector, InfLoRA bases). `load_continual` loads it back.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from petkit.core.disk_full import write_tensors
from petkit.continual.metrics import summarise
from petkit.continual.model import ContinualClassifier, build_classifier, encode_task
from petkit.continual.orthogonal import InfLora, OLora
from petkit.continual.plots import plot_matrix
from petkit.continual.routing import ConPet, Hide
from petkit.app.recipe import Recipe
from petkit.continual.strategy import (Context, Multitask, PerTask, Sequential, Strategy,
                                      continual_train, default_recipe)
from petkit.training.config import TrainConfig
from petkit.continual.tasks import SeqTask, parse_task, task_specs
from petkit.core.errors import AdapterLoadError, ConfigError
from petkit.core.io import load_adapter, save_adapter
from petkit.core.state import adapters

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (
    Sequential, Multitask, PerTask, OLora, InfLora, Hide, ConPet)}
ROUTING, ROUTING_TENSORS = "routing.json", "routing.safetensors"


@dataclass
class ContinualResult:
    """Accuracy matrices (rows: after task t; None: task not seen yet) and their metrics."""

    strategy: str
    tasks: list[str]
    matrix: list[list[float | None]]
    matrix_task_aware: list[list[float | None]]
    metrics: dict[str, float | None]
    metrics_task_aware: dict[str, float | None]
    uses_task_id: bool
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None


def _check(strategy: str, steps: int, lr: float, batch_size: int) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not 0 < lr <= 10:
        raise ConfigError(f"lr must be in (0, 10], got {lr!r}")


def _accuracies(strategy: Strategy, examples: list[dict], seen: int, task: int
                ) -> tuple[float, float]:
    """(task-agnostic, task-aware) accuracy on one task's test examples after `seen`."""
    model = strategy.model
    labels = torch.tensor([e["labels"] for e in examples])
    free = strategy.logits(examples, seen, task if strategy.uses_task_id else None)
    aware = strategy.logits(examples, seen, task) if strategy.routes else free
    block = model.block(task)
    aware_pred = aware[:, block].argmax(-1) + block.start
    return (float((free.argmax(-1) == labels).float().mean()),
            float((aware_pred == labels).float().mean()))


def _load_tasks(tasks: str | Sequence[str | SeqTask], max_train: int | None,
                max_test: int | None, seed: int) -> list[SeqTask]:
    if not isinstance(tasks, str) and tasks and all(isinstance(t, SeqTask) for t in tasks):
        return list(tasks)  # type: ignore[arg-type]
    specs = task_specs(tasks)  # type: ignore[arg-type]
    return [parse_task(s, max_train=max_train, max_test=max_test, seed=seed) for s in specs]


def run_continual(tasks: str | Sequence[str | SeqTask], strategy: str = "sequential", *,
                  recipe: Recipe | None = None, method: str | None = None,
                  model: str | None = None, output_dir: str | Path | None = None,
                  train: TrainConfig | None = None, lr: float | None = None,
                  steps: int | None = None, batch_size: int | None = None,
                  seed: int | None = None, max_train: int | None = 400,
                  max_test: int | None = 200, max_length: int = 64,
                  method_options: dict[str, Any] | None = None,
                  options: dict[str, Any] | None = None,
                  encoder: nn.Module | None = None, progress: bool = False) -> ContinualResult:
    """Learn `tasks` in order with `strategy`; score every seen task after each one.

    `tasks`: a sequence name (bbc-classes, domains), "A,B,C", or a list of task specs or
    `SeqTask`s. `recipe`: the run's sections (`strategy.default_recipe()` when not given: LoRA on
    minilm-l6, lr 1e-3, 60 steps per task, batch 16): its method and fields, its model and its
    train section (with runtime); the tasks and their sizes come from `tasks`, `max_train`,
    `max_test` and `max_length`. `method` / `method_options`, `model` and `train` replace those
    sections; `lr`, `steps` (multitask: steps x tasks), `batch_size` and `seed` are the loose
    keywords of earlier releases (deprecated: set them in `train` or the recipe). `options`:
    ortho_weight (o-lora), inflora_threshold, pool and replay (conpet). `encoder` replaces the
    named model (its examples must then already be token ids). `progress`: a bar over the tasks
    (the CLI's; off by default in the library).
    """
    loose = {k: v for k, v in (("lr", lr), ("steps", steps), ("batch_size", batch_size),
                               ("seed", seed)) if v is not None}
    if loose:
        warnings.warn(f"run_continual({', '.join(loose)}=...) is deprecated: give the train "
                      "section (train=TrainConfig(...), or recipe=)", DeprecationWarning,
                      stacklevel=2)
    recipe = _sections(recipe, method, model, train, method_options)
    model = recipe.model.name
    config = continual_train(recipe.train, **loose)
    _check(strategy, config.max_steps, config.lr, config.batch_size)
    seed = config.seed
    started = time.perf_counter()
    seq = _load_tasks(tasks, max_train, max_test, seed)
    classifier, tokenizer = build_classifier(model, [len(t.label_names) for t in seq], encoder)
    encoded = [encode_task(t, off, tokenizer, max_length) for t, off in
               zip(seq, classifier.offsets)]
    pad = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    fields = {k: v for k, v in recipe.method.items() if k != "name"}
    ctx = Context(classifier, seq, [tr for tr, _ in encoded], recipe.method_name, fields,
                  pad_id=pad, options=dict(options or {}), train=config)
    learner = STRATEGIES[strategy](ctx)
    size = len(seq)
    free: list[list[float | None]] = [[None] * size for _ in range(size)]
    aware: list[list[float | None]] = [[None] * size for _ in range(size)]
    rows = [size - 1] if learner.joint else range(size)
    bar = tqdm(total=len(rows), desc=f"{strategy}", unit="task", disable=not progress,
               dynamic_ncols=True)
    if learner.joint:
        bar.set_postfix_str(f"all {size} tasks at once")
        learner.learn_all()  # type: ignore[attr-defined]
    for t in rows:
        bar.set_postfix_str(f"task {t + 1}/{size}: {seq[t].name}")
        if not learner.joint:
            learner.learn(t)
        for i in range(t + 1):
            free[t][i], aware[t][i] = _accuracies(learner, encoded[i][1], t, i)
        bar.update(1)
    bar.close()
    result = ContinualResult(strategy, [t.name for t in seq], free, aware, summarise(free),
                             summarise(aware), learner.uses_task_id,
                             time.perf_counter() - started, learner.report)
    if output_dir is not None:
        result.output_dir = str(write_run(Path(output_dir), result, learner, model, seq))
    return result


def _sections(recipe: Recipe | None, method: str | None, model: str | None,
              train: TrainConfig | None, method_options: dict[str, Any] | None) -> Recipe:
    """The run's recipe: `recipe` (default: `default_recipe()`) with the sections given apart."""
    recipe = recipe or default_recipe()
    if method is not None or method_options:
        name = method or recipe.method_name
        kept = recipe.method if name == recipe.method_name else {}
        recipe = replace(recipe, method={**kept, "name": name, **(method_options or {})})
    if model is not None:
        recipe = replace(recipe, model=replace(recipe.model, name=model))
    if train is not None:
        recipe = replace(recipe, train=train)
    if recipe.model.quantize or recipe.model.prune:
        raise ConfigError("petkit continual uses its encoder as loaded: model.quantize and "
                          "model.prune do not apply")
    if recipe.train.output_dir is not None:  # each task would write over the last one's
        raise ConfigError("a continual run's folder is output_dir= (--output); drop "
                          "train.output_dir")
    recipe.method_config()  # a bad method name or field fails before any loading
    return recipe


def write_run(out: Path, result: ContinualResult, learner: Strategy, model_name: str,
              seq: list[SeqTask]) -> Path:
    """results.json, accuracy.png and adapters/ (adapter folders + routing) under `out`."""
    folder = out / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(adapters(learner.model))
    for name in names:
        save_adapter(learner.model, folder / name, name=name)
    routing = {"strategy": learner.name, "model": model_name, "method": learner.ctx.method,
               "adapters": names, "tasks": [t.name for t in seq],
               "label_names": [list(t.label_names) for t in seq],
               "options": learner.ctx.options}
    (folder / ROUTING).write_text(json.dumps(routing, indent=2))
    tensors = learner.routing_state()
    if tensors:
        write_tensors(folder / ROUTING_TENSORS, tensors)
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2))
    plot_matrix(result.matrix, result.tasks, out / "accuracy.png",
                f"{result.strategy}: accuracy on each task (no task id)")
    return out


def load_continual(folder: str | Path, encoder: nn.Module | None = None) -> Strategy:
    """The strategy of a finished run, adapters and routing loaded, ready for `.logits`."""
    folder = Path(folder)
    folder = folder / "adapters" if (folder / "adapters" / ROUTING).exists() else folder
    try:
        routing = json.loads((folder / ROUTING).read_text())
    except (OSError, ValueError) as err:
        raise AdapterLoadError(f"{folder / ROUTING}: not a continual run's routing file ({err})")
    seq = [SeqTask(n, tuple(labels), [], []) for n, labels in
           zip(routing["tasks"], routing["label_names"])]
    classifier, _ = build_classifier(routing["model"], [len(t.label_names) for t in seq], encoder)
    ctx = Context(classifier, seq, [[] for _ in seq], routing["method"],
                  options=routing.get("options", {}))
    learner = STRATEGIES[routing["strategy"]](ctx)
    for name in routing["adapters"]:
        load_adapter(classifier, folder / name, name=name)
    if (folder / ROUTING_TENSORS).exists():
        learner.load_routing(load_file(str(folder / ROUTING_TENSORS)))
    return learner


def predict(learner: Strategy, examples: list[dict], task: int | None = None) -> torch.Tensor:
    """Predicted global class of each encoded example after every task (task id optional)."""
    seen = len(learner.ctx.tasks) - 1
    if task is None and learner.uses_task_id:
        raise ConfigError(f"strategy {learner.name!r} needs the task id (task=...)")
    logits = learner.logits(examples, seen, task)
    if task is not None:
        block = learner.model.block(task)
        return logits[:, block].argmax(-1) + block.start
    return logits.argmax(-1)


__all__ = ["STRATEGIES", "ContinualClassifier", "ContinualResult", "load_continual", "predict",
           "run_continual"]
