"""Strategies that infer which adapter to use at test time: HiDe-style and ConPET.

- hide (after HiDe-Prompt / HiDe-LoRA, Wang et al., 2023, "Hierarchical Decomposition of
  Prompt-Based Continual Learning"): an adapter and head per task, frozen once learned, plus
  task-identity inference from the *frozen* model's features: each class keeps a prototype (the
  mean feature of its training examples, base model with every adapter off); a test example
  goes to the task owning its most similar prototype (cosine, after subtracting the mean of the
  tasks' features, which removes the direction every sentence shares), whose adapter then
  classifies it among that task's classes. No task id is needed.
- conpet (after Dynamic ConPET, Song et al., 2023, "ConPET: Continual Parameter-Efficient
  Tuning for Large Language Models"): a bounded pool of `pool` adapters; task t trains adapter
  min(t, pool - 1) on its data plus a replay memory of `replay` examples per earlier task that
  shares the adapter. A selector (linear, on the frozen features) trained on the current task
  and the replay memory of all earlier ones, class-balanced, picks the adapter at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from petkit.continual.strategy import Strategy
from petkit.core.model import activate, set_trainable
from petkit.core.state import adapters

SELECTOR_STEPS = 300
SELECTOR_LR = 0.05


class Hide(Strategy):
    """Per-task adapters + nearest-class-prototype task inference on frozen features."""

    name = "hide"
    routes = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prototypes = torch.zeros(0, 0)
        self.owner = torch.zeros(0, dtype=torch.long)  # task of each prototype
        self.task_means = torch.zeros(0, 0)  # mean frozen feature of each learned task

    def learn(self, task: int) -> None:
        self.add_adapter(f"task{task}", [task])
        self.fit(self.ctx.train_sets[task], [task], task)
        set_trainable(self.model, f"task{task}", False)
        examples = self.ctx.train_sets[task]
        feats = self.frozen_features(examples)
        labels = torch.tensor([e["labels"] for e in examples])
        block = self.model.block(task)
        protos = [feats[labels == c].mean(0) for c in range(block.start, block.stop)
                  if bool((labels == c).any())]
        self.prototypes = _append(self.prototypes, torch.stack(protos))
        self.task_means = _append(self.task_means, feats.mean(0, keepdim=True))
        self.owner = torch.cat([self.owner, torch.full((len(protos),), task)])

    def infer_task(self, examples: Sequence[dict], seen: int) -> torch.Tensor:
        """The task (<= seen) of each example's most similar class prototype."""
        keep = self.owner <= seen
        center = self.task_means[: seen + 1].mean(0)
        feats = F.normalize(self.frozen_features(examples) - center, dim=-1)
        sims = feats @ F.normalize(self.prototypes[keep] - center, dim=-1).T
        return self.owner[keep][sims.argmax(dim=-1)]

    def logits(self, examples: Sequence[dict], seen: int, task: int | None) -> torch.Tensor:
        owner = (self.infer_task(examples, seen) if task is None
                 else torch.full((len(examples),), task))
        plan = {t: (f"task{t}", [t]) for t in range(seen + 1)}
        return self.routed_scores(examples, owner, plan)

    def routing_state(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes.contiguous(), "owner": self.owner,
                "task_means": self.task_means.contiguous()}

    def load_routing(self, tensors: dict[str, torch.Tensor]) -> None:
        self.prototypes, self.owner = tensors["prototypes"], tensors["owner"].long()
        self.task_means = tensors["task_means"]


def _append(rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`rows` with `new` stacked below (`rows` may still be empty)."""
    return new if rows.numel() == 0 else torch.cat([rows, new])


class ConPet(Strategy):
    """A bounded pool of adapters, limited replay, and a learned adapter selector."""

    name = "conpet"
    routes = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool = int(self.ctx.options.get("pool", 2))
        self.replay = int(self.ctx.options.get("replay", 32))
        self.memory: dict[int, list[dict]] = {}
        self.selector = torch.nn.Linear(int(self.model.config.hidden_size), self.pool)

    def module_of(self, task: int) -> int:
        """The pool slot of a task: its own for the first pool - 1 tasks, then the last one."""
        return min(task, self.pool - 1)

    def members(self, module: int, seen: int) -> list[int]:
        """Tasks 0..seen that share adapter `module`."""
        return [t for t in range(seen + 1) if self.module_of(t) == module]

    def learn(self, task: int) -> None:
        module, total = self.module_of(task), len(self.ctx.tasks)
        name = f"module{module}"
        if name not in adapters(self.model):
            self.add_adapter(name, self.members(module, total - 1))
        else:
            activate(self.model, name)
            set_trainable(self.model, name, True)
        members = self.members(module, task)
        replayed = [e for t in members[:-1] for e in self.memory[t]]
        self.fit(self.ctx.train_sets[task] + replayed, members, task)
        set_trainable(self.model, name, False)
        generator = torch.Generator().manual_seed(self.ctx.seed + task)
        pick = torch.randperm(len(self.ctx.train_sets[task]), generator=generator)[: self.replay]
        self.memory[task] = [self.ctx.train_sets[task][i] for i in sorted(pick.tolist())]
        self.train_selector(task)

    def train_selector(self, task: int) -> None:
        """Fit the selector on the current task's data and every earlier task's memory."""
        examples = self.ctx.train_sets[task] + [e for t in range(task) for e in self.memory[t]]
        owners = ([task] * len(self.ctx.train_sets[task])
                  + [t for t in range(task) for _ in self.memory[t]])
        target = torch.tensor([self.module_of(t) for t in owners])
        feats = self.frozen_features(examples)
        counts = torch.bincount(target, minlength=self.pool).float()
        weight = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), 0.0)
        torch.manual_seed(self.ctx.seed + task)
        self.selector.reset_parameters()
        optimiser = torch.optim.Adam(self.selector.parameters(), lr=SELECTOR_LR)
        allowed = torch.arange(self.pool) <= self.module_of(task)
        for _ in range(SELECTOR_STEPS):
            logits = self.selector(feats).masked_fill(~allowed, -1e4)
            loss = F.cross_entropy(logits, target, weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    @torch.no_grad()
    def select(self, examples: Sequence[dict], seen: int) -> torch.Tensor:
        """The adapter slot the selector picks for each example."""
        allowed = torch.arange(self.pool) <= self.module_of(seen)
        logits = self.selector(self.frozen_features(examples)).masked_fill(~allowed, -1e4)
        return logits.argmax(dim=-1)

    def logits(self, examples: Sequence[dict], seen: int, task: int | None) -> torch.Tensor:
        if task is None:
            owner = self.select(examples, seen)
            plan = {m: (f"module{m}", self.members(m, seen)) for m in range(self.pool)}
        else:
            owner = torch.full((len(examples),), self.module_of(task))
            plan = {self.module_of(task): (f"module{self.module_of(task)}", [task])}
        return self.routed_scores(examples, owner, plan)

    def routing_state(self) -> dict[str, torch.Tensor]:
        return {f"selector.{k}": v.detach().contiguous()
                for k, v in self.selector.state_dict().items()}

    def load_routing(self, tensors: dict[str, torch.Tensor]) -> None:
        self.selector.load_state_dict({k.removeprefix("selector."): v for k, v in tensors.items()})
