"""`train`: the one training loop. The objective computes losses, the stepper updates parameters.

Per step: take `grad_accum` micro-batches from the seeded data order, let the stepper update the
trainable parameters, log, evaluate every `eval_every` steps (keeping a copy of the best
tensors), checkpoint every `save_every` steps. At the end the best tensors are restored, the
adapter is saved with `pk.save_adapter` and the curves are plotted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import resource
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from petkit.core.run_lock import RunLock
from petkit.core.errors import ConfigError
from petkit.training import checkpoint as ckpt
from petkit.training.batching import (Batch, CollateFn, DataPosition, Example, micro_batches, move,
                                   total_steps)
from petkit.training.step_hooks import StepHooks
from petkit.training.config import TrainConfig
from petkit.training.guards import check_inputs, check_not_merged, usable_batches
from petkit.training.distributed import Distributed
from petkit.training.evaluate import autocast, resolve_collate, run_objective
from petkit.training.monitor import Monitor, plot_history
from petkit.training.tracking import open_trackers
from petkit.training.objectives import Objective
from petkit.training.placement import cpu_threads
from petkit.training.objectives_preference import PreferenceObjective, pair_collate
from petkit.training.run_modes import RunModes, check_modes, packed_collate
from petkit.training.dp import with_dp
from petkit.training.steppers.ist import with_ist
from petkit.training.steppers import Stepper, make_stepper
from petkit.training.steppers.base import bind_model, log_fields
from petkit.training.steppers.base import report as stepper_report
from petkit.core.io import save_adapter
from petkit.core.model import trainable_parameters
from petkit.core.initialize import initialize, pending
from petkit.core.state import active_adapters, adapters


@dataclass
class TrainResult:
    """What a run did. `metric` is "accuracy" (higher is better) or "loss" (lower is better)."""

    steps: int
    best_step: int | None
    best_metric: float | None
    metric: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    adapter_path: str | None = None
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)  # the stepper's summary (IST layers)
    tokens_per_s: float = 0.0  # input tokens per second over the last `log_every` steps


def require_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The active adapters' trainable parameters (petkit's contract), by path."""
    check_not_merged(model)
    params = dict(trainable_parameters(model))
    if not params:
        raise ConfigError("the model has no trainable parameters: attach a method first "
                          "(pk.attach(model, pk.make_config('lora')))")
    return params


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_active_adapters(model: nn.Module, path: Path) -> Path:
    """`pk.save_adapter` to `path`; with several active adapters, one sub-folder per name."""
    names = active_adapters(model) or ["default"]
    if len(names) == 1:
        return save_adapter(model, path, name=names[0])
    for name in names:
        save_adapter(model, path / name, name=name)
    return path


def save_parameters(model: nn.Module, path: Path, params: dict[str, nn.Parameter]) -> Path:
    """No adapter attached (`parameters=` trained the model's own tensors): those tensors, by
    path, in `path`/trained.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: p.detach().contiguous().cpu() for k, p in params.items()}, path / "trained.safetensors")
    return path


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (dropout and any stepper noise draw from these)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _improves(metrics: dict[str, float], state: ckpt.TrainerState, metric: str) -> bool:
    """Higher accuracy, or equal accuracy with lower loss; for LM tasks lower loss."""
    if state.best_metric is None or state.best_loss is None:
        return True
    if metric == "accuracy" and metrics["accuracy"] != state.best_metric:
        return metrics["accuracy"] > state.best_metric
    return metrics["loss"] < state.best_loss


INIT_BATCHES = 4  # batches a data-driven initialisation reads before the first step


class _Run:
    """State of one call to `train`; each method is one phase of a step."""

    def __init__(self, model: nn.Module, data: Sequence[Example], config: TrainConfig,
                 eval_data: Sequence[Example] | None, collate: CollateFn,
                 parameters: dict[str, nn.Parameter] | None = None,
                 objective: Objective | None = None) -> None:
        self.model, self.data, self.config, self.collate = model, data, config, collate
        self.eval_data = eval_data if eval_data else None
        self.out = Path(config.output_dir) if config.output_dir else None
        self.params = dict(parameters) if parameters else require_trainable(model)
        self.modes = RunModes(model, config.runtime, self.params, config.label_token_ids)  # device, precision, loss, memory
        self.job = Distributed(model, config.runtime.distributed)  # torchrun: DDP / FSDP2, rank 0 writes
        self.params = self.job.sharded(self.params)  # FSDP2 replaced them by DTensors
        self.device = self.modes.device
        self.objective = self._objective(objective)
        self._forward = self.modes.wrap(self.dense_loss)  # compiled / offloaded when asked
        self.tokens, self.clock, self.speeds = 0, time.perf_counter(), list[float]()
        self.total = total_steps(len(data), config)
        seed_everything(config.seed)
        self.stepper: Stepper = make_stepper(self.params, self.job.local_config(config),
                                             self.total)
        bind_model(self.stepper, model)  # optional hook: a population stepper batches its passes
        self.stepper = with_ist(self.stepper, model, self.params, config)  # IST when asked
        self.stepper = with_dp(self.stepper, model, self.params, config, self.total, len(data))
        self.stepper = self.job.wrap(self.stepper)  # under torchrun: this rank's share of a step
        self.hooks = StepHooks(model)  # methods' per-step hooks (COLA links, expert load)
        self.state = ckpt.TrainerState()
        self.skipped = 0  # steps whose every label was ignored
        self.kernels = ""  # which fused kernels ran (`note_kernels`)
        self.best: dict[str, torch.Tensor] | None = None
        self.metric: str | None = None
        self._resume_or_reset()
        if not self.state.step:
            self._data_init()
        trackers = open_trackers(config.report_to, self.out, config.to_dict(), self.state.step,
                                 self.state.history) if self.job.writer else []
        self.monitor = Monitor(self.out if self.job.writer else None, self.total, self.state.step,
                               self.state.history, config.progress and self.job.writer, trackers)

    def _objective(self, given: Objective | None) -> Objective:
        """`given`, else the config's preference objective, else the model's own loss (chunked
        where the head bypass applies; an objective of its own reads the real logits)."""
        spec = self.config.objective
        if given is None and spec is not None and spec.name == "grpo":
            raise ConfigError("--objective grpo samples completions and scores them: pass "
                              "objective=GRPOObjective(...) (petkit.training.grpo) to train")
        if given is None and spec is not None and spec.is_preference:
            given = PreferenceObjective(spec)
        if given is None:
            return self.modes.objective()
        self.modes.bypass = None
        return given

    def _data_init(self) -> None:
        """A data-driven LoRA init (--method.init eva|corda|lora-ga: core/initialize.py) reads the
        first few training batches, with this run's loss."""
        size = self.config.batch_size
        rows = range(0, min(len(self.data), INIT_BATCHES * size), size)
        for name in [n for n in active_adapters(self.model) if pending(self.model, n)]:
            batches = [move(self.collate(list(self.data[i:i + size])), self.device) for i in rows]
            initialize(self.model, batches, name, loss=lambda model, batch: self.dense_loss(batch))

    def _resume_or_reset(self) -> None:
        """Continue from the newest complete checkpoint, or clear stale ones of an older run."""
        if self.out is None:
            return
        shapes = {k: tuple(p.shape) for k, p in self.params.items()}
        latest = ckpt.intact_checkpoint(self.out, shapes) if self.config.resume else None
        if latest is None:
            shutil.rmtree(ckpt.checkpoint_dir(self.out), ignore_errors=True)
            return
        self.state, self.best, stepper_state = self.job.load_checkpoint(latest, self.params,
                                                                         self.config)
        self.stepper.load_state_dict(stepper_state)
        keys = {k for row in self.state.history for k in row}
        self.metric = ("accuracy" if "eval_accuracy" in keys
                       else "loss" if "eval_loss" in keys else None)

    def dense_loss(self, batch: Batch) -> torch.Tensor:
        """Forward + objective for one micro-batch on the device, under the run's precision."""
        with autocast(self.config.runtime.precision, self.device):
            return self.objective(self.job.forward_model, batch).loss

    def loss(self, batch: Batch) -> torch.Tensor:
        """The stepper's loss function: the (compiled / offloaded) forward of one micro-batch."""
        self.tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        return self._forward(move(self.modes.trim(batch), self.device))

    def first_batch(self) -> Batch | None:
        """One collated example on the device (to check the chunked loss against the dense)."""
        if not len(self.data):
            return None
        return move(self.modes.trim(self.collate([self.data[0]])), self.device)

    def evaluate(self) -> None:
        """Evaluate, record, keep the best tensors, count evaluations without improvement."""
        assert self.eval_data is not None
        size = self.config.eval_batch_size or self.config.batch_size
        metrics = run_objective(self.model, self.eval_data, self.objective, batch_size=size,
                                collate=self.collate, precision=self.config.runtime.precision)
        self.metric = self.metric or ("accuracy" if "accuracy" in metrics else "loss")
        row = {"step": self.state.step, **{f"eval_{k}": v for k, v in metrics.items()}}
        self.state.history.append(row)
        self.monitor.record(row)
        if _improves(metrics, self.state, self.metric):
            self.state.best_metric, self.state.best_loss = metrics[self.metric], metrics["loss"]
            self.state.best_step, self.state.bad_evals = self.state.step, 0
            self.best = {k: p.detach().clone() for k, p in self.params.items()}
        else:
            self.state.bad_evals += 1

    def should_stop(self) -> bool:
        """Early stopping: `patience` evaluations in a row without improvement."""
        patience = self.config.early_stopping_patience
        return patience is not None and self.state.bad_evals >= patience

    def save(self) -> None:
        """Checkpoint the current step."""
        assert self.out is not None
        pending = self.state.pending_losses
        pending[:] = [float(x) for x in pending]
        self.job.save_checkpoint(self.out, self.state, dict(self.params), self.best,
                                 self.stepper.state_dict(), self.config)

    def loop(self) -> None:
        """Step until `total` steps or early stopping."""
        cfg, losses = self.config, self.state.pending_losses
        steps = micro_batches(self.data, cfg, self.state.position, self.collate)
        self.model.train()
        self.hooks.on_step(self.state.step, self.total)
        while self.state.step < self.total and not self.should_stop():
            lr = self.stepper.current_lr()
            micro = usable_batches(next(steps), cfg.label_token_ids is not None)
            if micro:
                losses.append(self.stepper.step(micro, self.loss))
            else:  # every label ignored: the loss would be NaN; no update, counted
                self.skipped += 1
                warnings.warn(f"step {self.state.step + 1}: every label of the batch is ignored "
                              f"(-100); skipped ({self.skipped} so far)", stacklevel=2)
            self.state.step += 1
            self.hooks.on_step(self.state.step, self.total)
            self.monitor.advance()
            step, last = self.state.step, self.state.step == self.total
            if (step % cfg.log_every == 0 or last) and losses:
                self.log_train(losses, lr)
                losses.clear()
            if self.eval_data and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                self.evaluate()
            if self.out is not None and cfg.save_every and step % cfg.save_every == 0:
                self.save()

    def log_train(self, losses: list[float | torch.Tensor], lr: float) -> None:
        """Record the mean train loss since the last log row (the one device sync of the
        steps since: the losses are read back here)."""
        losses = [float(x) for x in losses]
        pos: DataPosition = self.state.position
        now = time.perf_counter()  # throughput since the last row (kept out of the history)
        self.speeds.append(self.tokens / max(now - self.clock, 1e-9))
        self.tokens, self.clock = 0, now
        row = {"step": self.state.step, "train_loss": sum(losses) / len(losses), "lr": lr,
               "epoch": pos.epoch + pos.index / len(self.data), **self.hooks.metrics(),
               **log_fields(self.stepper), **log_fields(self.objective)}
        self.state.history.append(row)
        self.monitor.record(row)

    def note_kernels(self) -> None:
        """Log which kernels run (`--runtime.kernels`), and keep it for the result's report."""
        if self.config.runtime.kernels != "none":
            self.kernels = self.modes.kernels.note()
            self.monitor.info(f"kernels: {self.kernels}")

    def finish(self, started: float) -> TrainResult:
        """Restore the best tensors, save the adapter and the plot, build the result."""
        if self.best is not None:
            with torch.no_grad():
                for key, param in self.params.items():
                    param.copy_(self.best[key])
        adapter = None
        if self.out is not None:
            save = save_active_adapters if adapters(self.model) else \
                functools.partial(save_parameters, params=self.params)
            adapter = str(self.job.save_adapters(save, self.out / "adapter", self.params))
        if self.out is not None and self.job.writer:
            plot_history(self.state.history, self.out / "training.png", self.metric or "loss")
        report = stepper_report(self.stepper)
        if self.skipped:
            report = {**report, "skipped_batches": self.skipped}
        if self.kernels:
            report = {**report, "kernels": self.kernels}
        best = "" if self.state.best_step is None else \
            f" best_step={self.state.best_step} best_{self.metric}={self.state.best_metric}"
        self.monitor.info(f"done: step={self.state.step}{best}"
                          + "".join(f" {k}={v}" for k, v in report.items()))
        self.monitor.close()
        return TrainResult(steps=self.state.step, best_step=self.state.best_step,
                           best_metric=self.state.best_metric, metric=self.metric,
                           history=self.state.history, adapter_path=adapter,
                           seconds=time.perf_counter() - started,
                           peak_memory_mb=peak_memory_mb(self.device), report=report,
                           tokens_per_s=self.speeds[-1] if self.speeds else 0.0)


def preflight(model: nn.Module, train_data: Sequence[Example], config: TrainConfig) -> None:
    """Make every check `train` makes of the model, the data size and the config, then stop.

    Call it before slow work that precedes training (loading, a baseline evaluation), so a
    mistake (nothing trainable, an IST top-k above the model's layer count, a CMA-ES subspace
    larger than the delta) is reported in seconds. Nothing is trained or changed.
    """
    params = require_trainable(model)
    check_modes(model, config.runtime)  # device, packing, checkpointing
    stepper = make_stepper(params, config, total_steps(len(train_data), config))
    bind_model(stepper, model)  # e.g. head_lr set on a model without a trainable copy
    with_ist(stepper, model, params, config)
    with_dp(stepper, model, params, config, total_steps(len(train_data), config), len(train_data))


def train(model: nn.Module, train_data: Sequence[Example], config: TrainConfig | None = None,
          eval_data: Sequence[Example] | None = None, *, collate_fn: CollateFn | None = None,
          pad_id: int = 0, parameters: dict[str, nn.Parameter] | None = None,
          objective: Objective | None = None) -> TrainResult:
    """Train the model's trainable (delta) parameters on encoded `train_data`.

    `train_data`/`eval_data` are sequences of encoded examples ({"input_ids", "attention_mask",
    "labels"}); never pass the test split. With `eval_data`, the best-by-validation tensors are
    restored at the end. With `config.output_dir`, the adapter is saved to `output_dir/adapter`
    with metrics.jsonl, train.log, training.png and (if `save_every`) checkpoints.
    `parameters` ({path: Parameter}) trains those instead of the petkit adapters' (baselines:
    full fine-tuning, another library's adapters). `objective` replaces the loss (a GRPO
    objective; a preference objective is built from `config.objective`, and its pair batches
    from `pair_collate` unless `collate_fn` is given: docs/objectives.md).
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    spec = config.objective
    if collate_fn is None and spec is not None and spec.is_preference:
        collate_fn = functools.partial(pair_collate, pad_id=pad_id)
    with cpu_threads(config.runtime.threads):
        check_inputs(model, train_data, eval_data, config.label_token_ids, collate_fn, pad_id)
        with _run_lock(config):
            collate = (packed_collate(config.runtime, collate_fn, pad_id, config.label_token_ids)
                       or resolve_collate(collate_fn, pad_id))
            run = _Run(model, train_data, config, eval_data, collate, parameters, objective)
            try:
                with run.modes.installed(run.first_batch(), run.dense_loss):
                    run.note_kernels()
                    run.loop()
            except BaseException:
                run.monitor.close()
                raise
            return run.finish(started)


def _run_lock(config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """One live run per `output_dir` (rank 0 holds it under torchrun): `CheckpointError` naming
    the holder when another run has it."""
    if config.output_dir is None or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return RunLock(config.output_dir)
