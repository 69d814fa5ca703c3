"""`TrainConfig`: what a training run trains — length, batch, learning rate and schedule,
evaluation, checkpoints, logs, the optimizer — validated on construction, JSON round-trip.

Where and how it executes (device, precision, compile, recomputation, packing, distributed) is
the runtime section, `TrainConfig.runtime` (`runtime.py`); its flat keys of earlier releases
(`TrainConfig(device="cpu")`) still work, with a DeprecationWarning, and `cfg.device` reads
`cfg.runtime.device`. Loop fields live here; each stepper's own knobs live in its own config dataclass (a
`steppers.base.StepperConfig`), defined and registered in the stepper's file
(`steppers/backprop.py` `BackpropConfig`, `steppers/zeroth.py` `ZOConfig`, `steppers/cma_es.py`
`CmaConfig`), and IST's in `steppers/ist.py` (`IstConfig`); `sections.py` resolves the
optimizer to its stepper and holds the checks across sections:

    TrainConfig(optimizer="mezo", stepper=ZOConfig(eps=1e-2))   # or stepper="zo", or a dict
    TrainConfig(ist=IstConfig(top_k=2))

`stepper` is normalised to a config object: "auto" (the default) takes the default config of the
stepper that serves `optimizer`; a name takes that stepper's defaults; a dict ({"name": "zo",
"eps": 0.01}, as in YAML) is read field by field. A stepper config left at its defaults follows
`optimizer`, so `cfg.replace(optimizer="mezo")` works; a non-default one must serve it.
The flat keys of earlier releases (`zo_eps`, `es_dim`, `ist_top_k`, ...) are still accepted, with
a DeprecationWarning, and mapped onto the nested configs (`LEGACY_KEYS`).

A bad value raises `ConfigError` naming the field and its allowed range, so a typo in a recipe or
a CLI flag fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any

from petkit.core.config_io import dataclass_from_dict
from petkit.core.errors import ConfigError
from petkit.training.dp import DPConfig
from petkit.training.runtime import RUNTIME_FIELDS, RuntimeConfig
from petkit.training.objectives_config import ObjectiveConfig
from petkit.training.schedule import SCHEDULES
from petkit.training.sections import check_sections, resolve_stepper, stepper_configs, stepper_for
from petkit.training.steppers.base import StepperConfig, is_int, is_num
from petkit.training.steppers.ist import IstConfig
from petkit.training.tracking import tracker_names

__all__ = ["SCHEDULES", "TrainConfig"]
# Flat keys of earlier releases -> (stepper name or "ist", field of that config).
LEGACY_KEYS = {"zo_eps": ("zo", "eps"), "zo_n_spsa": ("zo", "n_spsa"),
               "zo_momentum": ("zo", "momentum"), "zo_log": ("zo", "log"),
               "es_dim": ("cma", "dim"), "es_popsize": ("cma", "popsize"),
               "es_sigma": ("cma", "sigma"), "ist_top_k": ("ist", "top_k"),
               "ist_every": ("ist", "every")}

def _help(text: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """A field's metadata: the help text `--train.<field>` shows (petkit.cli_sections)."""
    return {"help": text, **({"choices": choices} if choices else {})}


def _check(ok: bool, field: str, allowed: str, value: object) -> None:
    """Raise `ConfigError` for `field` unless `ok`."""
    if not ok:
        raise ConfigError(f"TrainConfig.{field} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train the trainable (delta) parameters of a model.

    Length: `max_steps` (optimiser steps) and/or `epochs`; when both are set the run stops at
    whichever comes first. Warm-up: `warmup_steps`, or `warmup_ratio` of the total steps.
    `eval_every=0` evaluates only at the end; `save_every=0` writes no intermediate checkpoints.
    `label_token_ids` switches to verbaliser classification on a decoder (no new head).
    `optimizer` picks the stepper: adamw/sgd backprop, mezo/zo-adam zeroth-order, cma CMA-ES;
    `stepper` holds that stepper's own config (see the module docstring); `ist` turns on IST.
    `head_lr` (None: `lr`) is the learning rate of full trainable copies (`modules_to_save`, e.g.
    a new task head) under backprop; every other trainable parameter trains at `lr`.
    """

    lr: float = field(default=2e-4, metadata=_help("learning rate (a method's own default: "
                                                   "its suggested rate)"))
    head_lr: float | None = field(default=None, metadata=_help(
        "learning rate of full trainable copies (a new task head) under backprop (none: lr)"))
    max_steps: int | None = field(default=100, metadata=_help(
        "optimiser steps (none: epochs decide; both set: whichever comes first)"))
    epochs: float | None = field(default=None, metadata=_help("passes over the training data"))
    batch_size: int = field(default=8, metadata=_help("examples per micro-batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimiser step"))
    optimizer: str = field(default="adamw", metadata=_help(
        "adamw | sgd (backprop), mezo | zo-adam (zeroth-order), cma (CMA-ES), or a registered "
        "stepper's optimizer"))
    weight_decay: float = field(default=0.0, metadata=_help("decoupled weight decay"))
    warmup_steps: int = field(default=0, metadata=_help("steps of linear warm-up"))
    warmup_ratio: float | None = field(default=None, metadata=_help(
        "warm-up as a fraction [0, 1) of the total steps (instead of warmup_steps)"))
    schedule: str = field(default="linear", metadata=_help(
        "learning-rate decay after warm-up", choices=SCHEDULES))
    max_grad_norm: float | None = field(default=1.0, metadata=_help(
        "clip the gradient to this L2 norm (none: no clipping)"))
    eval_every: int = field(default=0, metadata=_help(
        "validate every N steps and keep the best tensors (0: only at the end)"))
    eval_batch_size: int | None = field(default=None, metadata=_help(
        "examples per evaluation batch (none: 16)"))
    early_stopping_patience: int | None = field(default=None, metadata=_help(
        "stop after this many evaluations without improvement"))
    seed: int = field(default=0, metadata=_help("seed of data order and initialisation"))
    output_dir: str | None = field(default=None, metadata=_help(
        "run folder: adapter, logs, checkpoints, results.json"))
    save_every: int = field(default=0, metadata=_help(
        "write a checkpoint every N steps (0: none; needs output_dir)"))
    keep_checkpoints: int = field(default=2, metadata=_help("checkpoints kept (newest first)"))
    log_every: int = field(default=10, metadata=_help("log a row every N steps"))
    report_to: str | list[str] = field(default="", metadata=_help(
        "trackers besides train.log, comma-separated: tensorboard, mlflow (docs/tracking.md)"))
    label_token_ids: list[int] | None = field(default=None, metadata=_help(
        "verbaliser classification on a decoder: the label words' token ids"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest checkpoint in output_dir"))
    resume_override: bool = field(default=False, metadata=_help(
        "resume even though max_steps / lr / schedule / batch changed"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    stepper: StepperConfig | str | dict[str, Any] = field(default="auto", metadata=_help(
        "the stepper: auto (the one serving optimizer) or a stepper's name; its own settings "
        "are --train.stepper.FIELD"))
    ist: IstConfig | dict[str, Any] | None = field(default=None, metadata=_help(
        "IST: importance-sampled layers (--train.ist.top_k)"))
    dp: DPConfig | dict[str, Any] | None = field(default=None, metadata=_help(
        "DP-SGD on the delta (training/dp.py, docs/privacy.md; --dp.epsilon)"))
    objective: ObjectiveConfig | dict[str, Any] | str | None = field(default=None, metadata=_help(
        "none: the model's own loss (SFT); else an objective's name or settings "
        "(--train.objective.FIELD, docs/objectives.md)"))
    # Where and how the run executes (training/runtime.py; the recipe's `runtime:` section).
    runtime: RuntimeConfig | dict[str, Any] = field(default_factory=RuntimeConfig, metadata=_help(
        "where and how the run executes: the runtime section (--runtime.FIELD)"))
    # Flat keys of earlier releases (deprecated; see LEGACY_KEYS): accepted, never stored.
    zo_eps: InitVar[float | None] = None
    zo_n_spsa: InitVar[int | None] = None
    zo_momentum: InitVar[float | None] = None
    zo_log: InitVar[bool | None] = None
    es_dim: InitVar[int | None] = None
    es_popsize: InitVar[int | None] = None
    es_sigma: InitVar[float | None] = None
    ist_top_k: InitVar[int | None] = None
    ist_every: InitVar[int | None] = None
    # Runtime fields of earlier releases (deprecated): mapped onto `runtime`, read back through it.
    device: InitVar[str | None] = None
    precision: InitVar[str | None] = None
    delta_dtype: InitVar[str | None] = None
    compile: InitVar[bool | None] = None
    compile_scope: InitVar[str | None] = None
    activation_checkpointing: InitVar[str | None] = None
    activation_offload: InitVar[bool | None] = None
    activation_budget: InitVar[float | None] = None
    loss_chunk: InitVar[int | None] = None
    packing: InitVar[bool | None] = None
    pack_length: InitVar[int | None] = None
    distributed: InitVar[str | None] = None

    def __post_init__(self, *legacy: Any) -> None:
        """Validate every field; resolve the stepper and IST configs; map flat legacy keys."""
        for f in dataclasses.fields(self):  # nan/inf pass every range check written as a < b
            value = getattr(self, f.name)
            _check(not isinstance(value, float) or value - value == 0, f.name, "a finite number",
                   value)
        self._check_length()
        self._check_optimisation()
        self._check_io()
        flat = dict(zip(RUNTIME_FIELDS, legacy[len(LEGACY_KEYS):]))
        object.__setattr__(self, "runtime", _runtime(self.runtime, flat))
        object.__setattr__(self, "report_to", tracker_names(self.report_to))
        if self.label_token_ids is not None:
            ids = list(self.label_token_ids)
            _check(len(ids) >= 2 and all(is_int(i) and i >= 0 for i in ids), "label_token_ids",
                   "None or a list of >= 2 non-negative token ids", self.label_token_ids)
            object.__setattr__(self, "label_token_ids", ids)
        object.__setattr__(self, "stepper", resolve_stepper(self.optimizer, self.stepper))
        if isinstance(self.ist, dict):
            object.__setattr__(self, "ist", IstConfig.from_dict(self.ist))
        _check(self.ist is None or isinstance(self.ist, IstConfig), "ist",
               "None, an IstConfig or a mapping of its fields", self.ist)
        if isinstance(self.dp, dict):
            object.__setattr__(self, "dp", DPConfig.from_dict(self.dp))
        _check(self.dp is None or isinstance(self.dp, DPConfig), "dp",
               "None, a DPConfig or a mapping of its fields", self.dp)
        if self.dp is not None and self.runtime.loss_chunk is None:  # DP's vmap cannot trace the
            # chunked (checkpointed) loss: dense logits
            object.__setattr__(self, "runtime", dataclasses.replace(self.runtime, loss_chunk=0))
        object.__setattr__(self, "objective", ObjectiveConfig.from_value(self.objective))
        given = {k: v for k, v in zip(LEGACY_KEYS, legacy[:len(LEGACY_KEYS)]) if v is not None}
        if given:
            self._apply_legacy(given)
        check_sections(self)

    def _apply_legacy(self, given: dict[str, Any]) -> None:
        """Map flat keys onto the nested configs; keys of a stepper not in use are only checked."""
        nested = [("ist." if LEGACY_KEYS[k][0] == "ist" else "stepper.") + LEGACY_KEYS[k][1]
                  for k in sorted(given)]
        warnings.warn(f"TrainConfig keys {sorted(given)} are deprecated: use {nested} "
                      "(TrainConfig.stepper holds the stepper's config, TrainConfig.ist IST's)",
                      DeprecationWarning, stacklevel=4)
        groups: dict[str, dict[str, Any]] = {}
        for key, value in given.items():
            owner, field = LEGACY_KEYS[key]
            groups.setdefault(owner, {})[field] = value
        ist = groups.pop("ist", None)
        if ist is not None:
            if "top_k" in ist:
                base = self.ist.to_dict() if self.ist else {}
                object.__setattr__(self, "ist", IstConfig.from_dict({**base, **ist}))
            else:  # ist_every without ist_top_k: checked, nothing to switch on
                IstConfig.from_dict({"top_k": 1, **ist})
        for name, fields in groups.items():
            if name == self.stepper.NAME:
                object.__setattr__(self, "stepper", dataclasses.replace(self.stepper, **fields))
            else:  # another stepper's knobs (validated, then unused, as before)
                stepper_configs()[name](**fields).check(self)

    def _check_length(self) -> None:
        _check(self.max_steps is not None or self.epochs is not None, "max_steps",
               "set (or epochs set)", self.max_steps)
        if self.max_steps is not None:
            _check(is_int(self.max_steps) and self.max_steps >= 1, "max_steps", "an int >= 1",
                   self.max_steps)
        if self.epochs is not None:
            _check(is_num(self.epochs) and 0 < self.epochs < float("inf"), "epochs",
                   "a finite number > 0", self.epochs)
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            _check(is_int(value) and value >= 1, name, "an int >= 1", value)
        if self.eval_batch_size is not None:
            _check(is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "eval_batch_size",
                   "None or an int >= 1", self.eval_batch_size)

    def _check_optimisation(self) -> None:
        _check(is_num(self.lr) and 0 < self.lr <= 10, "lr", "a number in (0, 10]", self.lr)
        if self.head_lr is not None:
            _check(is_num(self.head_lr) and 0 < self.head_lr <= 10, "head_lr",
                   "None or a number in (0, 10]", self.head_lr)
        stepper_for(self.optimizer)  # ConfigError listing the optimizers when none serves it
        _check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        _check(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
               "a number >= 0", self.weight_decay)
        _check(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
               "an int >= 0", self.warmup_steps)
        if self.warmup_ratio is not None:
            _check(is_num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio",
                   "None or a number in [0, 1)", self.warmup_ratio)
        if self.max_grad_norm is not None:
            _check(is_num(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm",
                   "None or a number > 0", self.max_grad_norm)

    def _check_io(self) -> None:
        _check(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "an int in [0, 2**32)",
               self.seed)  # numpy's seed range
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            _check(is_int(value) and value >= 0, name, "an int >= 0", value)
        _check(is_int(self.log_every) and self.log_every >= 1, "log_every", "an int >= 1",
               self.log_every)
        _check(is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints",
               "an int >= 1", self.keep_checkpoints)
        if self.early_stopping_patience is not None:
            _check(is_int(self.early_stopping_patience) and self.early_stopping_patience >= 1,
                   "early_stopping_patience", "None or an int >= 1", self.early_stopping_patience)
        for name in ("resume", "resume_override", "progress"):
            value = getattr(self, name)
            _check(isinstance(value, bool), name, "true or false", value)
        needs_dir = self.resume or self.save_every > 0
        _check(self.output_dir is not None or not needs_dir, "output_dir",
               "set when resume or save_every is used", self.output_dir)

    def stepper_name(self) -> str:
        """The registered stepper this run uses."""
        assert isinstance(self.stepper, StepperConfig)
        return self.stepper.NAME

    def warmup(self, total_steps: int) -> int:
        """Number of warm-up steps for a run of `total_steps` optimiser steps."""
        if self.warmup_ratio is not None:
            return int(self.warmup_ratio * total_steps)
        return self.warmup_steps

    def resume_identity(self) -> dict[str, Any]:
        """Values a resumed run must share with its checkpoint to continue the same trajectory."""
        return {"seed": self.seed, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "optimizer": self.optimizer, "stepper": self.stepper_name(),
                "label_token_ids": self.label_token_ids,
                "ist_top_k": self.ist.top_k if isinstance(self.ist, IstConfig) else None}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field; `stepper`, `ist`, `dp`... as nested dicts."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["label_token_ids"] = (list(self.label_token_ids)
                                   if self.label_token_ids is not None else None)
        data["stepper"] = self.stepper.to_dict()  # type: ignore[union-attr]
        data["ist"] = self.ist.to_dict() if isinstance(self.ist, IstConfig) else None
        data["runtime"] = self.runtime.to_dict()  # type: ignore[union-attr]
        data["objective"] = (self.objective.to_dict()
                             if isinstance(self.objective, ObjectiveConfig) else None)
        data["dp"] = self.dp.to_dict() if isinstance(self.dp, DPConfig) else None
        return data

    def to_json(self) -> str:
        """JSON text; `TrainConfig.from_json(cfg.to_json()) == cfg`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (flat legacy keys allowed); unknown keys raise `ConfigError`."""
        return dataclass_from_dict(cls, data, "TrainConfig", extra=(*LEGACY_KEYS, *RUNTIME_FIELDS))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (and validated); a flat runtime key (deprecated) changes
        `runtime`. (`dataclasses.replace` works too, except for a new `runtime` at once: it
        passes the old runtime's values back as flat keys.)"""
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return type(self)(**{**kept, **changes})

    def __getattr__(self, name: str) -> Any:
        """Runtime fields of earlier releases read through `runtime` (`cfg.device` is
        `cfg.runtime.device`); called only for names the instance does not have."""
        if name in RUNTIME_FIELDS and "runtime" in self.__dict__:
            return getattr(self.runtime, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


for _name in RUNTIME_FIELDS:  # InitVar defaults would shadow __getattr__ as class attributes
    delattr(TrainConfig, _name)


def _runtime(runtime: Any, flat: dict[str, Any]) -> RuntimeConfig:
    """`TrainConfig.runtime` as a RuntimeConfig, with the flat keys of earlier releases
    (`TrainConfig(device="cpu")`, `train: {precision: bf16}`) applied and a DeprecationWarning."""
    if isinstance(runtime, dict):
        runtime = RuntimeConfig.from_dict(runtime)
    _check(isinstance(runtime, RuntimeConfig), "runtime",
           "a RuntimeConfig or a mapping of its fields", runtime)
    given = {k: v for k, v in flat.items() if v is not None and v != getattr(runtime, k)}
    if not given:
        return runtime
    warnings.warn(f"TrainConfig keys {sorted(given)} moved to the runtime section: use "
                  f"{['runtime.' + k for k in sorted(given)]} (RuntimeConfig; --runtime.<field>, "
                  "a recipe's runtime: section)", DeprecationWarning, stacklevel=5)
    return dataclasses.replace(runtime, **given)
