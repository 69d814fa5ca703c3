"""Backpropagation stepper: AdamW or SGD, gradient accumulation, clipping, LR schedule,
`TrainConfig.head_lr` (a second parameter group for full trainable copies such as a new head) and
LoRA+ (`--stepper.loraplus_ratio`: Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of
Large Models", arXiv:2402.12354 — the B factors of low-rank wrappers train at lr * ratio).

One step = `len(micro_batches)` forward/backward passes whose gradients are averaged, an optional
clip of the global grad norm to `max_grad_norm`, one optimiser update, one scheduler tick.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from petkit.core.capabilities import FactorLoadable, LowRank, capable_text, lowrank_factors
from petkit.core.delta import iter_deltas
from petkit.core.errors import ConfigError
from petkit.core.model import trainable_copy_parameters
from petkit.training.file_store import FileStore
from petkit.training.offload import HostOffloadOptimizer, offload_wanted
from petkit.training.schedule import lr_factor
from petkit.training.steppers.base import Batch, LossFn, StepperConfig, is_num, register_stepper

if TYPE_CHECKING:  # annotations only: the run's config resolves its stepper from the registry
    from petkit.training.config import TrainConfig


@dataclass(frozen=True)
class BackpropConfig(StepperConfig):
    """Backprop's own settings: SGD momentum, AdamW betas, and the fused AdamW kernel (None:
    fused when every parameter is on a GPU)."""

    NAME: ClassVar[str] = "backprop"
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adamw", "sgd")
    HEAD_LR: ClassVar[bool] = True

    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    fused: bool | None = None
    loraplus_ratio: float | None = None  # LoRA+: B factors (LowRank wrappers) at lr * ratio (paper: 16)

    def __post_init__(self) -> None:
        """Momentum and betas in [0, 1); fused None, true or false; loraplus_ratio None or > 0."""
        ratio = self.loraplus_ratio
        self.require(ratio is None or (is_num(ratio) and ratio > 0), "loraplus_ratio", "None or a number > 0", ratio)
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            self.require(is_num(value) and 0 <= value < 1, name, "a number in [0, 1)", value)
        self.require(self.fused is None or isinstance(self.fused, bool), "fused",
                     "None, true or false", self.fused)


def _optimizer(groups: list[list[nn.Parameter]], lrs: list[float],
               config: TrainConfig, host: bool = False) -> torch.optim.Optimizer:
    """The configured optimiser with one parameter group per entry of `groups`, at `lrs`
    (`host`: the masters of an offloaded run, where fused AdamW is the default)."""
    own = config.stepper
    assert isinstance(own, BackpropConfig)
    spec = [{"params": g, "lr": lr} for g, lr in zip(groups, lrs)]
    if config.optimizer == "sgd":
        return torch.optim.SGD(spec, lr=lrs[0], momentum=own.momentum,
                               weight_decay=config.weight_decay)
    params = [p for g in groups for p in g]
    fused = own.fused
    if fused is None:
        fused = bool(params) and all((host or p.device.type == "cuda") and p.dtype.is_floating_point
                                     for p in params)
    return torch.optim.AdamW(spec, lr=lrs[0], betas=(own.beta1, own.beta2),
                             weight_decay=config.weight_decay, fused=fused or None)


def lowrank_b_names(model: nn.Module, named: dict[str, nn.Parameter]) -> set[str]:
    """Names (in `named`) of the B factors of the model's low-rank wrappers, found by structure:
    the parameter a wrapper's `lowrank()` gives as B (a slice, as DyLoRA's, is not one)."""
    b_ids = {id(w.trained_factors()[1] if isinstance(w, FactorLoadable) else factors[1])
             for _, w in iter_deltas(model) if (factors := lowrank_factors(w)) is not None}
    return {n for n, p in named.items() if id(p) in b_ids}


class BackpropStepper:
    """Gradient descent on the trainable parameters with a torch optimiser.

    Without `head_lr`: one parameter group at `lr`. With it: group 0 holds the delta at `lr`,
    group 1 the full trainable copies (found on the model by `bind_model`) at `head_lr`; both
    follow the same schedule.
    """

    def __init__(self, params: dict[str, nn.Parameter], config: TrainConfig,
                 total_steps: int) -> None:
        """Optimiser over `params` (in dict order); schedule over `total_steps`."""
        self.named = dict(params)
        self.params = list(params.values())
        self.config = config
        self.max_grad_norm = config.max_grad_norm
        self.factor = functools.partial(lr_factor, total_steps=total_steps,
                                        warmup_steps=config.warmup(total_steps),
                                        schedule=config.schedule)
        self.head: set[str] = set()  # names of the full trainable copies' parameters
        self.lora_b: set[str] = set()  # names of low-rank B factors (LoRA+)
        own = config.stepper
        self.ratio = own.loraplus_ratio if isinstance(own, BackpropConfig) else None
        self.bound = config.head_lr is None and self.ratio is None  # both need bind_model first
        self.host: HostOffloadOptimizer | None = None  # --runtime.offload_optimizer=cpu on a GPU
        self._build()

    def _build(self) -> None:
        groups, lrs = self._groups(), self._lrs()
        if self.host is not None:
            self.host.close()  # regrouped by bind_model: the old hooks go
        if offload_wanted(self.params, self.config.runtime.offload_optimizer):
            build = functools.partial(_optimizer, lrs=lrs, config=self.config, host=True)
            runtime = self.config.runtime
            store = FileStore(runtime.offload_dir) if runtime.offload_optimizer == "nvme" else None
            self.optimizer = self.host = HostOffloadOptimizer(groups, build, store=store)
        else:
            self.optimizer, self.host = _optimizer(groups, lrs, self.config), None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.factor)

    def _lrs(self) -> list[float]:
        lrs = [self.config.lr]
        if self.ratio is not None and self.lora_b:
            lrs.append(self.config.lr * self.ratio)
        return lrs if self.config.head_lr is None else [*lrs, self.config.head_lr]

    def _names(self, groups: int) -> list[list[str]]:
        """Parameter names per optimiser group for a layout of `groups` groups (1: all; 2: the
        delta, then the full trainable copies; 3: the delta but B, LoRA+'s B factors, the copies).
        With LoRA+ and no head_lr, 2 groups are the delta but B, then B."""
        if groups == 1:
            return [list(self.named)]
        b = self.lora_b if self.ratio is not None else set()
        rest = [n for n in self.named if n not in self.head and n not in b]
        if groups == 2 and b and self.config.head_lr is None:
            return [rest, [n for n in self.named if n in b]]
        if groups == 2:
            return [[n for n in self.named if n not in self.head], [n for n in self.named if n in self.head]]
        return [rest, [n for n in self.named if n in b], [n for n in self.named if n in self.head]]

    def _order(self, groups: int) -> list[str]:
        """Parameter names in optimiser index order for a layout of `groups` groups."""
        return [n for names in self._names(groups) for n in names]

    def _groups(self) -> list[list[nn.Parameter]]:
        return [[self.named[n] for n in names] for names in self._names(len(self._lrs()))]

    def bind_model(self, model: nn.Module) -> None:
        """Find the full trainable copies (head_lr) and low-rank B factors (LoRA+); regroup."""
        self.head = set(trainable_copy_parameters(model)) & set(self.named)
        self.bound = True
        if self.ratio is not None:
            self.lora_b = lowrank_b_names(model, self.named)
            if not self.lora_b:
                warnings.warn(f"loraplus_ratio={self.ratio!r} has no effect: no trained low-rank B factor "
                              f"(methods with B: {capable_text(LowRank)})", UserWarning)
            self._build()
        if self.config.head_lr is None:
            return
        if not self.head:  # a warning, not an error: one config may serve head and verbaliser tasks
            warnings.warn(
                f"TrainConfig.head_lr={self.config.head_lr!r} has no effect: none of the trained "
                "parameters is a full trainable copy (modules_to_save, e.g. a new task head); "
                f"everything trains at lr={self.config.lr!r}", UserWarning)  # once per process
            return
        self._build()

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> torch.Tensor:
        """Average the micro-batches' gradients, clip, update, tick the schedule. The mean loss
        stays on the device (the loop reads it back when it logs): nothing in a step waits for
        the device, so the host prepares the next batch while this step runs."""
        if not self.bound:
            raise ConfigError("head_lr / loraplus_ratio need the model: call the stepper's "
                              "bind_model(model) before its first step (train() does)")
        losses = []
        host = self.host
        for i, batch in enumerate(micro_batches):
            if host is not None:  # gradients go to the host after the step's last backward
                host.final = i == len(micro_batches) - 1
            loss = loss_fn(batch)
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        if self.max_grad_norm is not None:
            clipped = self.params if host is None else host.clip_params()
            torch.nn.utils.clip_grad_norm_(clipped, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).double().sum() / len(micro_batches)

    def report(self) -> dict[str, Any]:
        """Where the optimiser state lived, when it was offloaded (TrainResult.report)."""
        return self.host.report() if self.host is not None else {}

    def current_lr(self) -> float:
        """Learning rate of the next update (of the delta, when the head has its own)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Optimiser and scheduler state (tensors and plain values only)."""
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": sched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore optimiser and scheduler state. A checkpoint of the other group layout (head_lr
        set or dropped under `resume_override`) is regrouped by parameter name; a base learning
        rate changed under `resume_override` applies from the resumed step on."""
        saved = state["optimizer"]
        if len(saved["param_groups"]) != len(self.optimizer.param_groups):
            saved = self._regrouped(saved)
        self.optimizer.load_state_dict(saved)
        groups = len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * groups))
        lrs = self._lrs()
        if list(self.scheduler.base_lrs) != lrs:  # only under resume_override (SCHEDULE)
            lr_now = [base * self.factor(self.scheduler.last_epoch) for base in lrs]
            for group, base, lr in zip(self.optimizer.param_groups, lrs, lr_now):
                group["initial_lr"], group["lr"] = base, lr
            self.scheduler.base_lrs, self.scheduler._last_lr = lrs, lr_now

    def _regrouped(self, saved: dict[str, Any]) -> dict[str, Any]:
        """`saved` (an optimiser state of another group layout) in this one's layout."""
        index = {name: i for i, name in enumerate(self._order(len(saved["param_groups"])))}
        new = self._order(len(self.optimizer.param_groups))
        state = {j: saved["state"][index[n]] for j, n in enumerate(new)
                 if index[n] in saved["state"]}
        hyper = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
        groups, start = [], 0
        for group in self.optimizer.param_groups:
            groups.append({**hyper, "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        return {"state": state, "param_groups": groups}


@register_stepper("backprop", config=BackpropConfig)
def _make_backprop(params: dict[str, nn.Parameter], config: TrainConfig,
                   total_steps: int) -> BackpropStepper:
    return BackpropStepper(params, config, total_steps)
