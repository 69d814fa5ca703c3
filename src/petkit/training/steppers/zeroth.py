"""Zeroth-order stepper: SPSA / MeZO (Malladi et al., 2023, "Fine-Tuning Language Models with
Just Forward Passes"), for any method's delta or for full parameters.

One step, for each of `n_spsa` perturbations k with seed s_k = f(run seed, step, k):

    theta += eps z_k ; f+ = L(theta) ; theta -= 2 eps z_k ; f- = L(theta) ; theta += eps z_k
    g_k  = (f+ - f-) / (2 eps)                   # projected gradient: one scalar
    ghat = (1/n) sum_k g_k z_k                   # z_k ~ N(0, I) regenerated from s_k, never stored

then ZO-SGD (theta <- (1 - lr wd) theta - lr ghat, optionally with momentum) or ZO-Adam on ghat.
Everything runs under `torch.no_grad()`: the memory is that of inference plus one parameter-sized
noise tensor at a time. When the delta is small (<= `COPY_LIMIT` elements) a copy restores it
bit-exactly after the two passes; otherwise the third perturbation restores it to float rounding.
Both passes of an estimate see the same dropout masks. `replay_mezo` redoes a logged run exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from petkit.core.errors import AdapterLoadError, ConfigError
from petkit.training.schedule import SCHEDULES, lr_factor
from petkit.training.steppers.base import (Batch, LossFn, StepperConfig, is_int, is_num,
                                           register_stepper)
from petkit.training.steppers.noise import (RngSnapshot, SeededNoise, mean_loss, parameters_sha256,
                                         require_parameters, step_seed)
from petkit.training.steppers.zo_log import LOG_NAME, ZOLog, read_log
from petkit.core.model import trainable_parameters

if TYPE_CHECKING:  # annotations only: the run's config resolves its stepper from the registry
    from petkit.training.config import TrainConfig

COPY_LIMIT = 2**24  # elements: deltas up to 64 MB (fp32) keep a copy for an exact restore
RULES = ("sgd", "adam")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def _require(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"ZOSettings.{field} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class ZOSettings:
    """Hyper-parameters of a zeroth-order run (what a log needs to replay it)."""

    lr: float
    eps: float = 1e-3
    n_spsa: int = 1
    rule: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    seed: int = 0
    exact_restore: bool | None = None

    def __post_init__(self) -> None:
        """Validate: eps > 0, n_spsa >= 1, lr >= 0 (0 is allowed: a probe that changes nothing)."""
        _require(self.lr >= 0 and math.isfinite(self.lr), "lr", "a finite number >= 0", self.lr)
        _require(self.eps > 0 and math.isfinite(self.eps), "eps", "a finite number > 0", self.eps)
        _require(isinstance(self.n_spsa, int) and self.n_spsa >= 1, "n_spsa", "an int >= 1",
                 self.n_spsa)
        _require(self.rule in RULES, "rule", f"one of {RULES}", self.rule)
        _require(0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        _require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        _require(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        _require(self.total_steps >= 1, "total_steps", "an int >= 1", self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ZOConfig(StepperConfig):
    """The zeroth-order stepper's own settings (`TrainConfig.stepper` for mezo / zo-adam):
    perturbation scale `eps`, `n_spsa` perturbations per step, ZO-SGD `momentum`, and `log`
    (append (seed, projected gradient) rows to output_dir/zo_log.jsonl for `replay_mezo`)."""

    NAME: ClassVar[str] = "zo"
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("mezo", "zo-adam")
    LEGACY_PREFIX: ClassVar[str] = "zo_"
    GRADIENT_FREE: ClassVar[bool] = True

    eps: float = 1e-3
    n_spsa: int = 1
    momentum: float = 0.0
    log: bool = False

    def __post_init__(self) -> None:
        """eps > 0, n_spsa in [1, 1024], momentum in [0, 1), log a bool."""
        self.require(is_num(self.eps) and self.eps > 0, "eps", "a number > 0", self.eps)
        self.require(is_int(self.n_spsa) and 1 <= self.n_spsa <= 1024, "n_spsa",
                     "an int in [1, 1024]", self.n_spsa)
        self.require(is_num(self.momentum) and 0 <= self.momentum < 1, "momentum",
                     "a number in [0, 1)", self.momentum)
        self.require(isinstance(self.log, bool), "log", "true or false", self.log)

    def check(self, train: TrainConfig) -> None:
        """The log is written to `output_dir`."""
        if self.log and train.output_dir is None:
            raise ConfigError("TrainConfig.output_dir must be set when stepper.log (train.zo_log) "
                              "is true (the log is written there)")


class SgdRule:
    """theta <- (1 - lr wd) theta - lr m, m = ghat (or momentum * m + ghat)."""

    def __init__(self, momentum: float, weight_decay: float) -> None:
        """Momentum buffers are created on first use."""
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buffers: dict[str, torch.Tensor] = {}

    def begin(self) -> None:
        """Nothing to do per step."""

    def apply(self, index: int, param: torch.Tensor, ghat: torch.Tensor, lr: float) -> None:
        """Update one parameter in place."""
        if self.weight_decay:
            param.mul_(1 - lr * self.weight_decay)
        if self.momentum:
            key = str(index)
            if key not in self.buffers:
                self.buffers[key] = torch.zeros_like(ghat)
            ghat = self.buffers[key].mul_(self.momentum).add_(ghat)
        param.add_(ghat, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffers."""
        return {"buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore momentum buffers."""
        self.buffers = dict(state["buffers"])


class AdamRule:
    """AdamW on the estimate ghat (bias-corrected moments, decoupled weight decay)."""

    def __init__(self, weight_decay: float) -> None:
        """Moments are created on first use."""
        self.weight_decay, self.t = weight_decay, 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def begin(self) -> None:
        """Count the step (bias correction)."""
        self.t += 1

    def apply(self, index: int, param: torch.Tensor, ghat: torch.Tensor, lr: float) -> None:
        """Update one parameter in place."""
        (b1, b2), key = ADAM_BETAS, str(index)
        if key not in self.m:
            self.m[key], self.v[key] = torch.zeros_like(ghat), torch.zeros_like(ghat)
        m = self.m[key].mul_(b1).add_(ghat, alpha=1 - b1)
        v = self.v[key].mul_(b2).addcmul_(ghat, ghat, value=1 - b2)
        if self.weight_decay:
            param.mul_(1 - lr * self.weight_decay)
        denom = (v / (1 - b2**self.t)).sqrt_().add_(ADAM_EPS)
        param.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))

    def state_dict(self) -> dict[str, Any]:
        """Step count and moments."""
        return {"t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step count and moments."""
        self.t, self.m, self.v = int(state["t"]), dict(state["m"]), dict(state["v"])


class ZOStepper:
    """SPSA / MeZO over `params`; see the module docstring. `log_path` records (seed, grad)."""

    def __init__(self, params: dict[str, nn.Parameter], settings: ZOSettings,
                 log_path: str | Path | None = None) -> None:
        """Prepare noise, restore buffers and the update rule; nothing is perturbed yet."""
        self.names = list(params)
        self.params = require_parameters(params, "zeroth-order stepper")
        self.settings = settings
        self.noise = SeededNoise(self.params)
        numel = sum(p.numel() for p in self.params)
        exact = settings.exact_restore
        self.exact = numel <= COPY_LIMIT if exact is None else exact
        self.backup = [torch.empty_like(p) for p in self.params] if self.exact else []
        self.rule = (AdamRule(settings.weight_decay) if settings.rule == "adam"
                     else SgdRule(settings.momentum, settings.weight_decay))
        self.t = 0
        self.log = ZOLog(log_path) if log_path is not None else None

    def current_lr(self) -> float:
        """Learning rate of the next step (base lr times the schedule)."""
        s = self.settings
        return s.lr * lr_factor(self.t, s.total_steps, s.warmup_steps, s.schedule)

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> float:
        """Estimate the projected gradient(s) with forward passes, then update; return mean loss."""
        if self.log is not None and not self.log.started:
            self.log.start(self.header(), self.t)
        s = self.settings
        seeds = [step_seed(s.seed, self.t, k) for k in range(s.n_spsa)]
        grads, losses = [], []
        with torch.no_grad():
            for seed in seeds:
                grad, loss = self._probe(seed, lambda: mean_loss(micro_batches, loss_fn))
                grads.append(grad)
                losses.append(loss)
        self._finish_step(seeds, grads, self.current_lr())
        return sum(losses) / len(losses)

    def replay_step(self, seeds: Sequence[int], grads: Sequence[float], lr: float) -> None:
        """Redo a logged step without forward passes (same float operations, same result)."""
        with torch.no_grad():
            if not self.exact:
                for seed in seeds:
                    self._probe(seed, None)
        self._finish_step(list(seeds), [float(g) for g in grads], float(lr))

    @torch.no_grad()
    def _probe(self, seed: int, loss: Callable[[], float] | None) -> tuple[float, float]:
        """Two-sided estimate along z(seed); parameters are back where they were afterwards."""
        if self.exact:
            for copy, p in zip(self.backup, self.params):
                copy.copy_(p)
        eps, rng = self.settings.eps, RngSnapshot()
        self.noise.perturb(seed, eps)
        f_plus = loss() if loss is not None else 0.0
        rng.restore()  # the minus pass sees the plus pass's dropout masks
        self.noise.perturb(seed, -2 * eps)
        f_minus = loss() if loss is not None else 0.0
        if self.exact:
            for copy, p in zip(self.backup, self.params):
                p.copy_(copy)
        else:
            self.noise.perturb(seed, eps)
        grad = (f_plus - f_minus) / (2 * eps)
        if not math.isfinite(grad):
            warnings.warn(f"zeroth-order step {self.t}: non-finite loss ({f_plus}, {f_minus}); "
                          "the step is skipped (lower zo_eps or lr)", stacklevel=3)
            grad = 0.0
        return grad, (f_plus + f_minus) / 2

    def _finish_step(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Apply ghat = mean_k g_k z_k parameter by parameter; log; count the step."""
        with torch.no_grad():
            self.rule.begin()
            streams = [self.noise.stream(seed) for seed in seeds]
            n = len(seeds)
            for index, param in enumerate(self.params):
                ghat = next(streams[0]).mul_(grads[0] / n)
                for stream, grad in zip(streams[1:], grads[1:]):
                    ghat.add_(next(stream), alpha=grad / n)
                self.rule.apply(index, param, ghat, lr)
        if self.log is not None:
            self.log.append(self.t, lr, seeds, grads)
        self.t += 1

    def header(self) -> dict[str, Any]:
        """What a replay needs besides the rows: settings, parameter layout, initial hash."""
        layout = [[n, list(p.shape), str(p.dtype).removeprefix("torch.")]
                  for n, p in zip(self.names, self.params)]
        return {"settings": self.settings.to_dict(), "params": layout,
                "exact_restore": self.exact, "device": self.params[0].device.type,
                "init_sha256": parameters_sha256(self.params)}

    def state_dict(self) -> dict[str, Any]:
        """Step count and the update rule's buffers (tensors and numbers only)."""
        return {"t": self.t, "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step count and buffers; the log is trimmed to this step on the next step."""
        self.t = int(state["t"])
        self.rule.load_state_dict(state["rule"])


def settings_from_config(config: TrainConfig, total_steps: int) -> ZOSettings:
    """The zeroth-order settings a `TrainConfig` describes."""
    own = config.stepper
    assert isinstance(own, ZOConfig)
    return ZOSettings(lr=config.lr, eps=own.eps, n_spsa=own.n_spsa,
                      rule="adam" if config.optimizer == "zo-adam" else "sgd",
                      momentum=own.momentum, weight_decay=config.weight_decay,
                      schedule=config.schedule, warmup_steps=config.warmup(total_steps),
                      total_steps=total_steps, seed=config.seed)


@register_stepper("zo", config=ZOConfig)
def _make_zo(params: dict[str, nn.Parameter], config: TrainConfig,
             total_steps: int) -> ZOStepper:
    own = config.stepper
    assert isinstance(own, ZOConfig)
    log = Path(config.output_dir) / LOG_NAME if own.log and config.output_dir else None
    return ZOStepper(params, settings_from_config(config, total_steps), log)


def _check_layout(header: dict[str, Any], params: dict[str, nn.Parameter], log: Path) -> None:
    have = [[n, list(p.shape)] for n, p in params.items()]
    want = [[n, list(shape)] for n, shape, _ in header["params"]]
    if have != want:
        diff = next((w, h) for w, h in itertools.zip_longest(want, have) if w != h)
        raise AdapterLoadError(f"{log}: the model's trainable parameters do not match the run's "
                               f"(first difference: log {diff[0]}, model {diff[1]})")
    if parameters_sha256(list(params.values())) != header["init_sha256"]:
        raise AdapterLoadError(f"{log}: the trainable parameters are not the run's initial values "
                               "(attach the method the same way, with the same seed, first)")


def replay_mezo(model: nn.Module, log: str | Path, steps: int | None = None,
                params: dict[str, nn.Parameter] | None = None) -> nn.Module:
    """Rebuild a zeroth-order run's result from its log, in place; returns `model`.

    `model` must hold the run's initial trainable values (checked by hash); `params` defaults to
    `pk.trainable_parameters(model)` (pass `dict(model.named_parameters())` for a full-parameter
    run). `steps` replays only the first `steps` steps (e.g. the run's best step). Replay on the
    device type the run used: CPU and CUDA draw different noise from the same seed.
    """
    header, rows = read_log(log)
    params = dict(trainable_parameters(model)) if params is None else dict(params)
    _check_layout(header, params, Path(log))
    if steps is not None and not 0 <= steps <= len(rows):
        raise ConfigError(f"steps must be in [0, {len(rows)}] for {log}, got {steps!r}")
    settings = ZOSettings(**{**header["settings"], "exact_restore": header["exact_restore"]})
    stepper = ZOStepper(params, settings)
    for row in rows[:steps]:
        stepper.replay_step(row["seeds"], row["grads"], row["lr"])
    return model
