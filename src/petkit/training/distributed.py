"""Several processes on torch.distributed (torchrun): DDP or FSDP2 around a model, one trajectory.

    torchrun --nproc-per-node 2 -m petkit train ...      (or: petkit train --nproc 2 ...)

The trajectory does not depend on the number of processes W. Every rank reads the same seeded
global data order (the loop's `DataPosition`, which checkpoints hold), and each micro-batch of
`batch_size` examples is cut into W contiguous row shards. Rank r computes shard r's loss scaled by

    w_r = W * units_r / units          (units: predicted tokens of a causal LM, else examples)

so the mean over ranks of the scaled losses is the loss one process computes on the whole
micro-batch. DDP and FSDP2 average gradients over ranks, hence the same gradient, the same delta
(to float rounding) and checkpoints that resume at any world size (2 -> 1, 1 -> 2).

- Gradient steppers: DDP (default when the model fits one device) reduces only parameters with
  `requires_grad` — the delta; `no_sync` on all but a step's last micro-batch. FSDP2
  (`fully_shard` per block and on the root) shards the frozen base too; only the delta's
  gradients are reduce-scattered. A bf16 base with fp32 deltas and non-reentrant checkpointing
  work under both.
- A loss computed without gradients (zeroth-order probes, IST scoring) is averaged across ranks at
  once: each MeZO forward all-reduces one scalar, so every rank computes the same projected
  gradient from the shared seed. A stepper that `SplitsPopulation` (CMA-ES) sees whole batches and
  evaluates its share of the candidates; the fitness values are all-gathered.
- Rank 0 alone writes checkpoints and adapters, with full (unsharded) tensors, in the
  single-process format; every rank can read them.
- Failure: collectives time out after `PETKIT_DIST_TIMEOUT` seconds (default 600); torchrun stops
  the job when a rank dies or raises. Process group, launching and row shards: `ranks.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from petkit.core.blocks import layer_paths
from petkit.core.errors import ConfigError
from petkit.training import checkpoint as ckpt
from petkit.training.config import DISTRIBUTED as MODES
from petkit.training.config import TrainConfig
from petkit.training.ranks import (RankGroup, cleanup, cut, init_from_env, launch, rank,
                                   world_size)
from petkit.training.steppers.ist import ISTStepper
from petkit.training.steppers import Batch, LossFn, Stepper
from petkit.training.steppers.base import WritesLog, log_fields
from petkit.training.steppers.base import report as stepper_report
from petkit.training.steppers.backprop import BackpropStepper

__all__ = ["JOB_KEYS", "Distributed", "RankGroup", "SplitsPopulation", "choose_mode", "cleanup",
           "cut", "full", "init_from_env", "launch", "rank", "report_lines", "shard_state",
           "world_size"]

JOB_KEYS = ("world_size", "distributed", "collective_bytes_per_step", "grad_bytes_per_step",
            "reduced_tensors")  # what `Distributed.report` adds to a run's report
FSDP_FRACTION = 0.4  # "auto": FSDP when the weights take more than this share of one GPU
Tensors = dict[str, torch.Tensor]


@runtime_checkable
class SplitsPopulation(Protocol):
    """A stepper that divides its candidates among ranks (CMA-ES) and sees whole batches."""

    def bind_group(self, group: RankGroup) -> None:
        """Evaluate only `group.share` of each population; `group.gather` the fitness."""
        ...


def _is_causal_lm(model: nn.Module) -> bool:
    """A decoder whose loss shifts labels by one (HF `...ForCausalLM`)."""
    return type(model).__name__.endswith("ForCausalLM")


def _weights_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def choose_mode(model: nn.Module, mode: str) -> str:
    """"auto" -> "fsdp" when the weights exceed FSDP_FRACTION of this GPU's memory, else "ddp"."""
    if mode not in MODES:
        raise ConfigError(f"TrainConfig.distributed must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cuda":
        return "ddp"
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if _weights_bytes(model) > FSDP_FRACTION * total else "ddp"


def _to_local_gpu(model: nn.Module) -> None:
    """A model placed on a GPU before the job began (all ranks on cuda:0): to this rank's GPU."""
    device = next((p.device for p in model.parameters()), None)
    if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
        model.to(torch.device("cuda", torch.cuda.current_device()))


def _broadcast_trainable(model: nn.Module) -> None:
    """Start every rank from rank 0's delta (a seeded init is equal anyway; this makes it sure)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def _fully_shard(model: nn.Module) -> None:
    """FSDP2: `fully_shard` each block of the stack, then the root (shards the frozen base)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(p.device for p in model.parameters())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for path in layer_paths(model):
        fully_shard(model.get_submodule(path), mesh=mesh)
    fully_shard(model, mesh=mesh)


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(obj: Any) -> Any:
    """`obj` (nested dicts / lists of tensors) with every DTensor gathered to a full tensor.

    Collective under FSDP: every rank must call it, in the same order.
    """
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full(v) for v in obj)
    if isinstance(obj, torch.Tensor) and _is_dtensor(obj):
        return obj.full_tensor().detach()
    return obj


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like DTensor `param` (same mesh and placements)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def shard_state(state: Any, params: list[torch.Tensor]) -> Any:
    """Inverse of `full` for an optimiser state: per-parameter entries ({index: {name: tensor}})
    whose tensors have the parameter's full shape become DTensors laid out like it."""
    if not isinstance(state, dict):
        return state
    per_param = state and all(isinstance(k, int) and 0 <= k < len(params) and isinstance(v, dict)
                              for k, v in state.items())
    if per_param:
        return {k: {n: _like(t, params[k]) if isinstance(t, torch.Tensor)
                    and _is_dtensor(params[k]) and t.shape == params[k].shape else t
                    for n, t in v.items()} for k, v in state.items()}
    return {k: shard_state(v, params) for k, v in state.items()}


@contextlib.contextmanager
def full_parameters(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Inside: `params` that are DTensors are swapped for full tensors in their modules (FSDP);
    `core.io.save_adapter` then writes the single-process format. Collective: all ranks."""
    wanted = {id(p) for p in params.values() if _is_dtensor(p)}
    owners = [(m, n, p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
              if id(p) in wanted]
    gathered = [p.full_tensor().detach() for _, _, p in owners]
    try:
        for (module, name, p), value in zip(owners, gathered):
            setattr(module, name, nn.Parameter(value, requires_grad=p.requires_grad))
        yield
    finally:
        for module, name, p in owners:
            setattr(module, name, p)


class Distributed:
    """What the training loop asks of the job: which module to run, who writes, how a step's data
    are split. Outside torchrun (or with mode "off") every method is the single-process path."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        """Join the process group if torchrun started us; FSDP2-shard `model` when chosen."""
        active = mode != "off" and init_from_env() and world_size() > 1
        self.model, self.forward_model = model, model
        self.group = RankGroup() if active else None
        self.mode = choose_mode(model, mode) if active else "off"
        self.writer = self.group is None or self.group.rank == 0
        self.causal = _is_causal_lm(model)
        self.ddp: nn.Module | None = None
        self.grad_bytes = 0
        self.reduced: set[int] = set()  # ids of the parameters DDP's buckets reduced
        self._moved: dict[int, nn.Parameter] = {}  # id(parameter before FSDP) -> after
        if self.group is not None:
            _to_local_gpu(model)
            _broadcast_trainable(model)
            if self.mode == "fsdp":
                owners = {id(p): (m, n) for m in model.modules()
                          for n, p in m.named_parameters(recurse=False)}
                _fully_shard(model)
                self._moved = {i: getattr(m, n) for i, (m, n) in owners.items()}

    def sharded(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """`params` as the model holds them now (FSDP2 replaced each by a DTensor parameter)."""
        return {k: self._moved.get(id(p), p) for k, p in params.items()}

    def local_config(self, config: TrainConfig) -> TrainConfig:
        """`config` for this rank's stepper: only rank 0 keeps the stepper's own log file."""
        stepper = config.stepper
        if self.writer or not (isinstance(stepper, WritesLog) and stepper.log):
            return config
        return config.replace(stepper=dataclasses.replace(stepper, log=False))

    def wrap(self, stepper: Stepper) -> Stepper:
        """The loop's stepper, adapted to the job (the same object outside one)."""
        if self.group is None:
            return stepper
        if self.mode == "fsdp" and not isinstance(stepper, (BackpropStepper, ISTStepper)):
            raise ConfigError("TrainConfig.distributed='fsdp' trains with gradients (backprop); "
                              "zeroth-order and CMA-ES keep the whole model on every rank: use "
                              "'ddp'")
        if isinstance(stepper, SplitsPopulation):
            stepper.bind_group(self.group)
            return _PopulationStepper(stepper, self)
        if self.mode == "ddp":
            self.forward_model = self._ddp(stepper)
        return _ShardedStepper(stepper, self)

    def _ddp(self, stepper: Stepper) -> nn.Module:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        device = next(p.device for p in self.model.parameters())
        ids = [device] if device.type == "cuda" else None
        # IST switches blocks' requires_grad per step: DDP must look for unused parameters.
        # Buffers are the base's (the same on every rank): never synced. torch >= 2.13 renamed
        # broadcast_buffers (and warns on the old name); 2.11 knows only the old one.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        ddp = DistributedDataParallel(self.model, device_ids=ids, init_sync=False,
                                      **{"forward_sync_buffers" if renamed
                                         else "broadcast_buffers": False},
                                      find_unused_parameters=isinstance(stepper, ISTStepper))

        # The default all-reduce, counting what it sends. (Unannotated: DDP checks annotations,
        # and this module's are strings.)
        def counted(state, bucket):  # type: ignore[no-untyped-def]
            buffer = bucket.buffer()
            self.grad_bytes += buffer.numel() * buffer.element_size()
            self.reduced.update(id(p) for p in bucket.parameters())
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counted)
        self.ddp = ddp
        return ddp

    def sync(self, on: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP: reduce gradients in this forward's backward only when `on` (a step's last
        micro-batch)."""
        if self.ddp is None or on:
            return contextlib.nullcontext()
        return self.ddp.no_sync()  # type: ignore[operator]

    def report(self, steps: int) -> dict[str, Any]:
        """World size, mode and the bytes sent per step (gradients, petkit's own collectives):
        the keys of `JOB_KEYS`."""
        if self.group is None:
            return {}
        out: dict[str, Any] = {"world_size": self.group.world, "distributed": self.mode,
                               "collective_bytes_per_step": self.group.bytes / max(steps, 1)}
        if self.ddp is not None:
            out["grad_bytes_per_step"] = self.grad_bytes / max(steps, 1)
            out["reduced_tensors"] = len(self.reduced)
        return out

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others may read)."""
        if self.group is not None:
            dist.barrier()

    def save_checkpoint(self, out: Path, state: ckpt.TrainerState, params: Tensors,
                        best: Tensors | None, stepper_state: dict[str, Any], config: Any) -> None:
        """`checkpoint.save_checkpoint` on rank 0, with full tensors (gathered on every rank)."""
        params, best, stepper_state = full(params), full(best), full(stepper_state)
        if self.writer:
            ckpt.save_checkpoint(out, state, params, best, stepper_state, config)
        self.barrier()

    def load_checkpoint(self, path: Path, params: dict[str, nn.Parameter],
                        config: Any) -> tuple[ckpt.TrainerState, Tensors | None, dict[str, Any]]:
        """`checkpoint.load_checkpoint`, whatever world size wrote it; reshards under FSDP."""
        if self.mode != "fsdp":
            return ckpt.load_checkpoint(path, params, config)
        plain = {k: nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
                 for k, p in params.items()}
        state, best, stepper_state = ckpt.load_checkpoint(path, plain, config)
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(_like(plain[key].data, p))
        if best is not None:
            best = {k: _like(v, params[k]) for k, v in best.items()}
        return state, best, shard_state(stepper_state, list(params.values()))

    def save_adapters(self, save: Callable[[nn.Module, Path], Path], path: Path,
                      params: dict[str, nn.Parameter]) -> Path:
        """`save(model, path)` on rank 0 with full delta tensors; every rank gets the path."""
        with full_parameters(self.model, params):
            if self.writer:
                save(self.model, path)
        self.barrier()
        return path


class _ShardedStepper:
    """Gives the inner stepper this rank's shard of each micro-batch and a weighted loss."""

    def __init__(self, inner: Stepper, job: Distributed) -> None:
        self.inner, self.job, self.steps = inner, job, 0
        assert job.group is not None
        self.group = job.group

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> float | torch.Tensor:
        """One step on this rank's rows; returns the global mean loss (same on every rank)."""
        shards = [cut(b, self.group.rank, self.group.world, self.job.causal) for b in micro_batches]
        weights = {id(s.batch): s.weight for s in shards}
        last, graphs = shards[-1].batch, [0]

        def local(batch: Batch) -> torch.Tensor:
            if not torch.is_grad_enabled():  # a number all ranks must agree on (MeZO, IST scores)
                value = float(loss_fn(batch)) * weights[id(batch)]
                return torch.tensor(self.group.mean([value])[0])
            graphs[0] += 1
            with self.job.sync(batch is last):
                return loss_fn(batch) * weights[id(batch)]

        loss = self.inner.step([s.batch for s in shards], local)
        self.steps += 1
        return self.group.mean([float(loss)])[0] if graphs[0] else loss

    def current_lr(self) -> float:
        """The inner stepper's."""
        return self.inner.current_lr()

    def state_dict(self) -> dict[str, Any]:
        """The inner stepper's (the data position is the loop's, global)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inner stepper's."""
        self.inner.load_state_dict(state)

    def log_fields(self) -> dict[str, Any]:
        """The inner stepper's log fields, if it has any."""
        return log_fields(self.inner)

    def report(self) -> dict[str, Any]:
        """The inner stepper's report plus the job's sizes and bytes per step."""
        return {**stepper_report(self.inner), **self.job.report(self.steps)}


class _PopulationStepper(_ShardedStepper):
    """Whole batches for a stepper that splits its population itself (it gathers the fitness)."""

    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> float | torch.Tensor:
        """The inner step; its population is spread over the ranks by `bind_group`."""
        self.steps += 1
        return self.inner.step(micro_batches, loss_fn)


def report_lines(report: dict[str, Any], verbose: bool = False) -> list[str]:
    """`key: value` lines of a run's report (e.g. IST's per-layer updates); the job's own keys
    (`JOB_KEYS`: bytes per step ...) only when `verbose`, else one line naming the job."""
    shown = {k: v for k, v in report.items() if verbose or k not in JOB_KEYS}
    lines = [f"{key}: {value}" for key, value in shown.items()]
    if not verbose and "world_size" in report:
        lines.append(f"{report['world_size']} processes ({report['distributed']}); --verbose "
                     f"shows the bytes they exchanged")
    return lines
