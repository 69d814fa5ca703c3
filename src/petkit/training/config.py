"""`TrainConfig`: every knob of a training run, validated on construction, JSON round-trip.

A bad value raises `ConfigError` naming the field and its allowed range, so a typo in a recipe or
a CLI flag fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from petkit.core.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd", "mezo", "zo-adam", "cma")
# The stepper each optimizer runs on when `stepper="auto"`.
OPTIMIZER_STEPPER = {"adamw": "backprop", "sgd": "backprop", "mezo": "zo", "zo-adam": "zo",
                     "cma": "cma"}
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


def _check(ok: bool, field: str, allowed: str, value: object) -> None:
    """Raise `ConfigError` for `field` unless `ok`."""
    if not ok:
        raise ConfigError(f"TrainConfig.{field} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """How to train the trainable (delta) parameters of a model.

    Length: `max_steps` (optimiser steps) and/or `epochs`; when both are set the run stops at
    whichever comes first. Warm-up: `warmup_steps`, or `warmup_ratio` of the total steps.
    `eval_every=0` evaluates only at the end; `save_every=0` writes no intermediate checkpoints.
    `label_token_ids` switches to verbaliser classification on a decoder (no new head).
    `stepper` names a registered stepper; "auto" picks it from `optimizer`: adamw/sgd backprop,
    mezo/zo-adam the zeroth-order stepper (`zo_*` fields), cma the CMA-ES stepper (`es_*` fields).
    """

    lr: float = 2e-4
    max_steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    eval_every: int = 0
    eval_batch_size: int | None = None
    early_stopping_patience: int | None = None
    ist_top_k: int | None = None  # IST: update only k importance-sampled layers per step
    ist_every: int = 10  # IST: re-score layer importance every this many steps
    seed: int = 0
    output_dir: str | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    label_token_ids: list[int] | None = None
    resume: bool = False
    stepper: str = "auto"
    progress: bool = True
    zo_eps: float = 1e-3
    zo_n_spsa: int = 1
    zo_momentum: float = 0.0
    zo_log: bool = False
    es_dim: int = 64
    es_popsize: int | None = None
    es_sigma: float = 0.01

    def __post_init__(self) -> None:
        """Validate every field; normalise `label_token_ids` to a list."""
        self._check_length()
        self._check_optimisation()
        self._check_io()
        self._check_gradient_free()
        if self.label_token_ids is not None:
            ids = list(self.label_token_ids)
            _check(len(ids) >= 2 and all(_is_int(i) and i >= 0 for i in ids), "label_token_ids",
                   "None or a list of >= 2 non-negative token ids", self.label_token_ids)
            object.__setattr__(self, "label_token_ids", ids)

    def _check_length(self) -> None:
        _check(self.max_steps is not None or self.epochs is not None, "max_steps",
               "set (or epochs set)", self.max_steps)
        if self.max_steps is not None:
            _check(_is_int(self.max_steps) and self.max_steps >= 1, "max_steps", "an int >= 1",
                   self.max_steps)
        if self.epochs is not None:
            _check(_is_num(self.epochs) and self.epochs > 0, "epochs", "a number > 0", self.epochs)
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, "an int >= 1", value)
        if self.eval_batch_size is not None:
            _check(_is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "eval_batch_size",
                   "None or an int >= 1", self.eval_batch_size)

    def _check_optimisation(self) -> None:
        _check(_is_num(self.lr) and 0 < self.lr <= 10, "lr", "a number in (0, 10]", self.lr)
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        _check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
               "a number >= 0", self.weight_decay)
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
               "an int >= 0", self.warmup_steps)
        if self.warmup_ratio is not None:
            _check(_is_num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio",
                   "None or a number in [0, 1)", self.warmup_ratio)
        if self.max_grad_norm is not None:
            _check(_is_num(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm",
                   "None or a number > 0", self.max_grad_norm)
        _check(isinstance(self.stepper, str) and bool(self.stepper), "stepper",
               "a registered stepper name", self.stepper)
        if self.ist_top_k is not None:
            _check(_is_int(self.ist_top_k) and self.ist_top_k >= 1, "ist_top_k",
                   "None or an int >= 1 (at most the model's number of layers)", self.ist_top_k)
        _check(_is_int(self.ist_every) and self.ist_every >= 1, "ist_every", "an int >= 1",
               self.ist_every)

    def _check_io(self) -> None:
        for name in ("eval_every", "save_every", "seed"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, name, "an int >= 0", value)
        _check(_is_int(self.log_every) and self.log_every >= 1, "log_every", "an int >= 1",
               self.log_every)
        _check(_is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints",
               "an int >= 1", self.keep_checkpoints)
        if self.early_stopping_patience is not None:
            _check(_is_int(self.early_stopping_patience) and self.early_stopping_patience >= 1,
                   "early_stopping_patience", "None or an int >= 1", self.early_stopping_patience)
        for name in ("resume", "progress"):
            _check(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        needs_dir = self.resume or self.save_every > 0
        _check(self.output_dir is not None or not needs_dir, "output_dir",
               "set when resume or save_every is used", self.output_dir)

    def _check_gradient_free(self) -> None:
        """Zeroth-order (`zo_*`) and evolution (`es_*`) knobs; checked whatever the optimizer."""
        _check(_is_num(self.zo_eps) and self.zo_eps > 0, "zo_eps", "a number > 0", self.zo_eps)
        _check(_is_int(self.zo_n_spsa) and 1 <= self.zo_n_spsa <= 1024, "zo_n_spsa",
               "an int in [1, 1024]", self.zo_n_spsa)
        _check(_is_num(self.zo_momentum) and 0 <= self.zo_momentum < 1, "zo_momentum",
               "a number in [0, 1)", self.zo_momentum)
        _check(isinstance(self.zo_log, bool), "zo_log", "true or false", self.zo_log)
        _check(not self.zo_log or self.output_dir is not None, "output_dir",
               "set when zo_log is true (the log is written there)", self.output_dir)
        _check(_is_int(self.es_dim) and self.es_dim >= 2, "es_dim", "an int >= 2", self.es_dim)
        if self.es_popsize is not None:
            _check(_is_int(self.es_popsize) and self.es_popsize >= 2, "es_popsize",
                   "None or an int >= 2", self.es_popsize)
        _check(_is_num(self.es_sigma) and self.es_sigma > 0, "es_sigma", "a number > 0",
               self.es_sigma)
        wanted = OPTIMIZER_STEPPER[self.optimizer]
        _check(self.stepper not in set(OPTIMIZER_STEPPER.values()) or self.stepper == wanted,
               "stepper", f"'auto' or {wanted!r} for optimizer={self.optimizer!r}", self.stepper)

    def stepper_name(self) -> str:
        """The registered stepper this run uses (`stepper`, or the optimizer's when "auto")."""
        return OPTIMIZER_STEPPER[self.optimizer] if self.stepper == "auto" else self.stepper

    def warmup(self, total_steps: int) -> int:
        """Number of warm-up steps for a run of `total_steps` optimiser steps."""
        if self.warmup_ratio is not None:
            return int(self.warmup_ratio * total_steps)
        return self.warmup_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """JSON text; `TrainConfig.from_json(cfg.to_json()) == cfg`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise `ConfigError` listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"TrainConfig has no field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)
