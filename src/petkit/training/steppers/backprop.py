"""Backpropagation stepper: AdamW or SGD, gradient accumulation, clipping, LR schedule,
`TrainConfig.head_lr` (a second parameter group for full trainable copies such as a new head),
LoRA+ (`--stepper.loraplus_ratio`: Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of
Large Models", arXiv:2402.12354 — the B factors of low-rank wrappers train at lr * ratio) and
per-adapter rates (`--stepper.adapter_lr ia3=1e-2`: with several adapters active and trained
together, each named adapter's parameters train at its own rate, the rest at `lr`).

One step = `len(micro_batches)` forward/backward passes whose gradients are averaged, an optional
clip of the global grad norm to `max_grad_norm`, one optimiser update, one scheduler tick.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from petkit.core.capabilities import FactorLoadable, LowRank, capable_text, lowrank_factors
from petkit.core.delta import iter_deltas
from petkit.core.errors import ConfigError
from petkit.core.model import parameter_adapters, trainable_copy_parameters
from petkit.core.state import adapters
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
    adapter_lr: tuple[str, ...] = ()  # "NAME=LR" per adapter trained at its own rate (YAML: a mapping)

    def __post_init__(self) -> None:
        """Momentum and betas in [0, 1); fused None, true or false; loraplus_ratio None or > 0;
        adapter_lr "NAME=LR" entries (or a {NAME: LR} mapping), each LR in (0, 10], no name twice."""
        ratio = self.loraplus_ratio
        self.require(ratio is None or (is_num(ratio) and ratio > 0), "loraplus_ratio", "None or a number > 0", ratio)
        object.__setattr__(self, "adapter_lr", self._adapter_lr(self.adapter_lr))
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            self.require(is_num(value) and 0 <= value < 1, name, "a number in [0, 1)", value)
        self.require(self.fused is None or isinstance(self.fused, bool), "fused",
                     "None, true or false", self.fused)

    def _adapter_lr(self, value: object) -> tuple[str, ...]:
        """`adapter_lr` as "NAME=LR" texts (a mapping, a list of such texts or of [NAME, LR] pairs)."""
        allowed = "NAME=LR entries (or a {NAME: LR} mapping), each LR a number in (0, 10], each NAME once"
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        items = list(value.items()) if isinstance(value, Mapping) else value
        self.require(isinstance(items, (list, tuple)), "adapter_lr", allowed, value)
        pairs = [item.split("=", 1) if isinstance(item, str) else item for item in items]
        self.require(all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs), "adapter_lr", allowed, value)
        names = [str(name).strip() for name, _ in pairs]
        rates = [_rate(lr) for _, lr in pairs]
        self.require(all(names) and len(set(names)) == len(names)
                     and all(r is not None and 0 < r <= 10 for r in rates), "adapter_lr", allowed, value)
        return tuple(f"{name}={rate!r}" for name, rate in zip(names, rates))

    def to_dict(self) -> dict[str, Any]:
        """{"name": NAME, **fields}; `adapter_lr` only when set, so runs and benchmark cells from
        before it read (and fingerprint) the same."""
        data = super().to_dict()
        if not self.adapter_lr:
            del data["adapter_lr"]
        return data

    def adapter_rates(self) -> dict[str, float]:
        """`adapter_lr` as {adapter name: learning rate}."""
        return {name: float(rate) for name, rate in (item.split("=", 1) for item in self.adapter_lr)}


def _rate(value: object) -> float | None:
    """A learning rate from a number or its text ("1e-2"); None if it is neither."""
    if is_num(value):
        return float(value)  # type: ignore[arg-type]
    try:
        return float(str(value).strip())
    except ValueError:
        return None


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

    Optimiser groups, in index order (`_layout`): the delta at `lr`; with LoRA+, the B factors at
    lr * ratio; with `adapter_lr`, each named adapter's parameters at its rate (its B factors at
    rate * ratio); with `head_lr`, the full trainable copies (found on the model by
    `bind_model`). All follow the same schedule.
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
        self.rates = own.adapter_rates() if isinstance(own, BackpropConfig) else {}
        self.owner: dict[str, str] = {}  # parameter name -> adapter name, for `adapter_lr`'s adapters
        # head_lr, loraplus_ratio and adapter_lr need bind_model first
        self.bound = config.head_lr is None and self.ratio is None and not self.rates
        self.host: HostOffloadOptimizer | None = None  # --runtime.offload_optimizer=cpu on a GPU
        self._build()

    def _build(self) -> None:
        layout = self._layout()
        groups = [[self.named[n] for n in names] for names, _ in layout]
        lrs = [lr for _, lr in layout]
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

    def _layout(self) -> list[tuple[list[str], float]]:
        """(parameter names, lr) per optimiser group. The first group is always there (its lr is
        `current_lr`), the head's whenever `head_lr` is set; the others only when not empty."""
        lr, ratio = self.config.lr, self.ratio or 1.0
        b = self.lora_b if self.ratio is not None else set()
        head = self.head if self.config.head_lr is not None else set()
        own = [n for n in self.named if n not in head and n not in self.owner]
        layout = [([n for n in own if n not in b], lr), ([n for n in own if n in b], lr * ratio)]
        for adapter, rate in self.rates.items():
            mine = [n for n in self.named if self.owner.get(n) == adapter and n not in head]
            layout += [([n for n in mine if n not in b], rate), ([n for n in mine if n in b], rate * ratio)]
        kept = [layout[0], *(group for group in layout[1:] if group[0])]
        copies = [n for n in self.named if n in head]
        return kept if self.config.head_lr is None else [*kept, (copies, self.config.head_lr)]

    def _lrs(self) -> list[float]:
        return [lr for _, lr in self._layout()]

    def _legacy_names(self, groups: int) -> list[str]:
        """Parameter names in optimiser index order of a checkpoint that did not store its groups
        (before `adapter_lr`): 1 group: all; 2: the delta, then the full trainable copies (or, with
        LoRA+ and no head_lr, the delta but B, then B); 3: the delta but B, B, the copies."""
        if groups == 1:
            return list(self.named)
        b = self.lora_b if self.ratio is not None else set()
        rest = [n for n in self.named if n not in self.head and n not in b]
        if groups == 2 and b and self.config.head_lr is None:
            return [*rest, *[n for n in self.named if n in b]]
        if groups == 2:
            return [*[n for n in self.named if n not in self.head], *[n for n in self.named if n in self.head]]
        return [*rest, *[n for n in self.named if n in b], *[n for n in self.named if n in self.head]]

    def bind_model(self, model: nn.Module) -> None:
        """Find the full trainable copies (head_lr), low-rank B factors (LoRA+) and the
        parameters of `adapter_lr`'s adapters; regroup."""
        self.head = set(trainable_copy_parameters(model)) & set(self.named)
        self.bound = True
        if self.rates:
            self.owner = self._owners(model)
        if self.ratio is not None:
            self.lora_b = lowrank_b_names(model, self.named)
            if not self.lora_b:
                warnings.warn(f"loraplus_ratio={self.ratio!r} has no effect: no trained low-rank B factor "
                              f"(methods with B: {capable_text(LowRank)})", UserWarning)
        if self.config.head_lr is not None and not self.head:
            # a warning, not an error: one config may serve head and verbaliser tasks
            warnings.warn(
                f"TrainConfig.head_lr={self.config.head_lr!r} has no effect: none of the trained "
                "parameters is a full trainable copy (modules_to_save, e.g. a new task head); "
                f"everything trains at lr={self.config.lr!r}", UserWarning)  # once per process
        if self.ratio is not None or self.rates or (self.head and self.config.head_lr is not None):
            self._build()

    def _owners(self, model: nn.Module) -> dict[str, str]:
        """{trained parameter name: adapter} for the adapters `adapter_lr` names; raises
        ConfigError for a name that is no attached adapter, or one with nothing trained."""
        # by identity and by the wrappers: a wrapped model (DDP) renames its parameters and does
        # not hold the adapters' records
        found = parameter_adapters(model)
        attached = sorted(set(adapters(model)) | set(found.values()))
        unknown = [a for a in self.rates if a not in attached]
        if unknown:
            raise ConfigError(f"TrainConfig.stepper.adapter_lr names {unknown}, which no attached adapter "
                              f"is called; the model's adapters: {attached}")
        ours, tensors = {id(p): n for n, p in self.named.items()}, dict(model.named_parameters())
        owner = {ours[id(tensors[path])]: a for path, a in found.items()
                 if id(tensors[path]) in ours and a in self.rates}
        idle = [a for a in self.rates if a not in owner.values()]
        if idle:
            raise ConfigError(f"TrainConfig.stepper.adapter_lr names {idle}, whose parameters are not "
                              "trained here (activate the adapter, and load it with trainable=True)")
        return owner

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> torch.Tensor:
        """Average the micro-batches' gradients, clip, update, tick the schedule. The mean loss
        stays on the device (the loop reads it back when it logs): nothing in a step waits for
        the device, so the host prepares the next batch while this step runs."""
        if not self.bound:
            raise ConfigError("head_lr / loraplus_ratio / adapter_lr need the model: call the stepper's "
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
        names = [names for names, _ in self._layout()]
        return {"optimizer": self.optimizer.state_dict(), "scheduler": sched, "groups": names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore optimiser and scheduler state. A checkpoint of the other group layout (head_lr
        set or dropped under `resume_override`) is regrouped by parameter name; a base learning
        rate changed under `resume_override` applies from the resumed step on."""
        saved = state["optimizer"]
        order = [n for names in state.get("groups", ()) for n in names] \
            or self._legacy_names(len(saved["param_groups"]))
        if order != [n for names, _ in self._layout() for n in names] \
                or len(saved["param_groups"]) != len(self.optimizer.param_groups):
            saved = self._regrouped(saved, order)
        self.optimizer.load_state_dict(saved)
        groups = len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * groups))
        lrs = self._lrs()
        if list(self.scheduler.base_lrs) != lrs:  # only under resume_override (SCHEDULE)
            lr_now = [base * self.factor(self.scheduler.last_epoch) for base in lrs]
            for group, base, lr in zip(self.optimizer.param_groups, lrs, lr_now):
                group["initial_lr"], group["lr"] = base, lr
            self.scheduler.base_lrs, self.scheduler._last_lr = lrs, lr_now

    def _regrouped(self, saved: dict[str, Any], order: list[str]) -> dict[str, Any]:
        """`saved` (an optimiser state of another group layout, its parameters named in index
        order by `order`) in this one's layout."""
        index = {name: i for i, name in enumerate(order)}
        new = [n for names, _ in self._layout() for n in names]
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
