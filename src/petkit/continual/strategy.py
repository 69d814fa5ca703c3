"""What a continual strategy is, and the three reference strategies.

A strategy learns task t (`learn`), scores examples after the tasks 0..seen (`logits`), and
names what it saves (its adapters, in attach order, plus routing tensors). Everything goes
through petkit's contract: `attach` a named adapter per task or module (its head in
`modules_to_save`), `activate` the ones in play, `set_trainable(name, False)` to freeze a
finished one, and `train` on the task's examples.

    sequential   one adapter, tuned again on each task           (the forgetting baseline)
    multitask    one adapter, all tasks at once                   (the upper bound)
    per-task     one adapter per task, the task id picks it       (the oracle: needs the id)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch

from petkit.app.recipe import ModelSpec, Recipe
from petkit.continual.model import MASKED, ContinualClassifier, forward_all
from petkit.continual.tasks import SeqTask
from petkit.core.model import activate, attach, disabled, set_trainable
from petkit.core.registry import make_config
from petkit.core.state import adapters
from petkit.data.encode import collate
from petkit.training.config import TrainConfig
from petkit.training.loop import train


# The train section of a continual run when none is given: the one place its defaults live
# (`petkit continual` flags, `pk.continual` and `Context` all start from it).
DEFAULT_TRAIN = TrainConfig(lr=1e-3, max_steps=60, batch_size=16, progress=False)
DEFAULT_MODEL = "minilm-l6"


def default_recipe() -> Recipe:
    """The run description of a continual run when nothing is given: LoRA on minilm-l6 with
    `DEFAULT_TRAIN` (its data section is unused: the tasks come from the task specs)."""
    return Recipe(method={"name": "lora"}, model=ModelSpec(DEFAULT_MODEL), train=DEFAULT_TRAIN)


def continual_train(train: TrainConfig | None = None, **given: Any) -> TrainConfig:
    """`train` (default `DEFAULT_TRAIN`) with the loose keyword arguments of earlier releases
    (lr, steps, batch_size, seed; None: not given) applied on top."""
    names = {"lr": "lr", "steps": "max_steps", "batch_size": "batch_size", "seed": "seed"}
    changes = {names[k]: v for k, v in given.items() if v is not None}
    base = train or DEFAULT_TRAIN
    if changes.get("max_steps") is not None and base.epochs is not None:
        changes["epochs"] = None
    return base.replace(**changes) if changes else base


@dataclass
class Context:
    """What every strategy works on: the model, the tasks, their encoded examples, settings.

    `train` is the run's train section (each task trains `train.max_steps` steps, seed
    `train.seed + task`); lr / steps / batch_size / seed, if given, are applied onto it and are
    read back from it."""

    model: ContinualClassifier
    tasks: list[SeqTask]
    train_sets: list[list[dict]]
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    pad_id: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # strategy knobs (replay, pool, ...)
    train: TrainConfig = DEFAULT_TRAIN

    def __post_init__(self) -> None:
        self.train = continual_train(self.train, lr=self.lr, steps=self.steps,
                                     batch_size=self.batch_size, seed=self.seed)
        assert self.train.max_steps is not None, "a continual task trains a number of steps"
        self.lr, self.steps = self.train.lr, self.train.max_steps
        self.batch_size, self.seed = self.train.batch_size, self.train.seed

    def train_config(self, task: int, steps: int | None = None) -> TrainConfig:
        """The run's train section for `task`: its own seed, `steps` if given, no inner bar (the
        run has one over the tasks)."""
        return self.train.replace(max_steps=steps or self.steps, seed=self.train.seed + task,
                                  progress=False)


class Strategy:
    """Base: one adapter per task, all helpers shared by the concrete strategies."""

    name: ClassVar[str] = ""
    uses_task_id: ClassVar[bool] = False  # needs the task id at test time (the oracle)
    routes: ClassVar[bool] = False  # task-aware scores need their own forward pass
    joint: ClassVar[bool] = False  # learns every task at once (`learn_all`)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.report: dict[str, Any] = {}

    @property
    def model(self) -> ContinualClassifier:
        return self.ctx.model

    def add_adapter(self, name: str, heads: Sequence[int]) -> None:
        """Attach adapter `name` (the run's method) owning the heads of `heads`; it is active."""
        config = make_config(self.ctx.method, modules_to_save=tuple(f"heads.{h}" for h in heads),
                             **self.ctx.method_options)
        attach(self.model, config, name)

    def fit(self, examples: list[dict], visible: Sequence[int], task: int,
            parameters: dict[str, torch.nn.Parameter] | None = None,
            steps: int | None = None) -> None:
        """Train the active trainable adapters (or `parameters`) on `examples`."""
        self.model.visible = list(visible)
        train(self.model, examples, self.ctx.train_config(task, steps),
              collate_fn=partial(collate, pad_id=self.ctx.pad_id), parameters=parameters)

    def scores(self, examples: Sequence[dict], visible: Sequence[int]) -> torch.Tensor:
        """Logits (N, classes) of the model as it is now, `visible` tasks' classes unmasked."""
        self.model.visible = list(visible)
        return forward_all(self.model, examples, self.ctx.pad_id)

    def frozen_features(self, examples: Sequence[dict]) -> torch.Tensor:
        """Unit-norm pooled features of the base model (every adapter off): (N, hidden)."""
        with disabled(self.model):
            feats = forward_all(self.model, examples, self.ctx.pad_id, features=True)
        return torch.nn.functional.normalize(feats, dim=-1)

    def routed_scores(self, examples: Sequence[dict], owner: torch.Tensor,
                      plan: dict[int, tuple[str, list[int]]]) -> torch.Tensor:
        """Logits where example n is scored by adapter `plan[owner[n]][0]` with the tasks
        `plan[owner[n]][1]` visible (task-identity routing)."""
        out = torch.full((len(examples), sum(self.model.class_counts)), MASKED)
        for key in owner.unique().tolist():
            index = (owner == key).nonzero().flatten().tolist()
            name, visible = plan[key]
            activate(self.model, name)
            out[index] = self.scores([examples[i] for i in index], visible)
        return out

    def learn(self, task: int) -> None:
        """Learn task `task` (tasks before it are done)."""
        raise NotImplementedError

    def logits(self, examples: Sequence[dict], seen: int, task: int | None) -> torch.Tensor:
        """Scores after tasks 0..seen; `task` is the true task id, or None (task-agnostic)."""
        activate(self.model, list(adapters(self.model)))
        return self.scores(examples, range(seen + 1))

    def routing_state(self) -> dict[str, torch.Tensor]:
        """Tensors routing needs at test time (saved beside the adapters)."""
        return {}

    def load_routing(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `routing_state`."""


class Sequential(Strategy):
    """One adapter (all heads) tuned on each task in turn: what forgetting looks like."""

    name = "sequential"

    def learn(self, task: int) -> None:
        if not adapters(self.model):
            self.add_adapter("default", range(len(self.ctx.tasks)))
        self.fit(self.ctx.train_sets[task], range(task + 1), task)


class Multitask(Sequential):
    """One adapter on the union of every task's data, for as many steps as all tasks together."""

    name = "multitask"
    joint = True

    def learn_all(self) -> None:
        self.add_adapter("default", range(len(self.ctx.tasks)))
        everything = [e for examples in self.ctx.train_sets for e in examples]
        self.fit(everything, range(len(self.ctx.tasks)), 0,
                 steps=self.ctx.steps * len(self.ctx.tasks))


class PerTask(Strategy):
    """An adapter and head per task, frozen once learned; the true task id picks the adapter."""

    name = "per-task"
    uses_task_id = True
    routes = True

    def learn(self, task: int) -> None:
        self.add_adapter(f"task{task}", [task])
        self.fit(self.ctx.train_sets[task], [task], task)
        set_trainable(self.model, f"task{task}", False)

    def logits(self, examples: Sequence[dict], seen: int, task: int | None) -> torch.Tensor:
        if task is None:
            raise ValueError("per-task needs the task id")  # the runner always passes it
        activate(self.model, f"task{task}")
        return self.scores(examples, [task])
