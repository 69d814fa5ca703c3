"""`RuntimeConfig`: where and how a run executes — device, precision, compilation, activation
recomputation and offload, packing, the distributed mode — as opposed to what it trains
(`TrainConfig`: length, batch, learning rate and schedule, evaluation, checkpoints, logging).

It is the recipe's `runtime:` section and the `--runtime.<field>` flags; `TrainConfig.runtime`
carries it into `pk.train`, and the parts that read it (`placement.py`, `run_modes.py`,
`distributed.py`) receive only this section. A bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from petkit.core.config_io import dataclass_from_dict
from petkit.core.errors import ConfigError
from petkit.training.activations import QUANTIZED_ACTIVATIONS, RECOMPUTE_MODES
from petkit.training.kernels import kernel_parts, liger_parts
from petkit.training.offload import OFFLOAD_MODES
from petkit.training.steppers.base import is_int, is_num

PRECISIONS = ("auto", "fp32", "bf16")
DELTA_DTYPES = ("fp32", "bf16")
DISTRIBUTED = ("auto", "ddp", "fsdp", "off")  # training/distributed.py
COMPILE_SCOPES = ("model", "blocks")


def _help(text: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """A field's metadata: the help text (and choices) `--runtime.<field>` shows."""
    return {"help": text, **({"choices": choices} if choices else {})}


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"RuntimeConfig.{name} (--runtime.{name}) must be "
                          f"{allowed}, got {value!r}")


@dataclass(frozen=True)
class RuntimeConfig:
    """How a run executes (docs/training-gpu.md, docs/distributed.md); numbers of a run on one
    device do not depend on these except through precision."""

    device: str = field(default="auto", metadata=_help(
        "auto (the model's GPU, else cuda if any, else cpu) | cpu | cuda | cuda:N"))
    precision: str = field(default="auto", metadata=_help(
        "autocast: auto (bf16 where the device supports it) | fp32 | bf16", choices=PRECISIONS))
    delta_dtype: str = field(default="fp32", metadata=_help(
        "trainable deltas' dtype when precision is bf16", choices=DELTA_DTYPES))
    compile: bool = field(default=False, metadata=_help(
        "true: torch.compile the forward and loss"))
    compile_scope: str = field(default="model", metadata=_help(
        "model: one graph of forward + loss | blocks: each transformer block compiled once",
        choices=COMPILE_SCOPES))
    activation_checkpointing: str = field(default="off", metadata=_help(
        "recompute activations: off | full | every-K (K >= 2) | selective | elementwise"))
    activation_offload: bool = field(default=False, metadata=_help(
        "true: keep the blocks' saved activations in host memory, copied while the GPU computes "
        "(with compile: compile_scope=blocks; docs/training-gpu.md)"))
    offload_optimizer: str = field(default="none", metadata=_help(
        "none | cpu: optimiser state, fp32 masters and updates in host memory | nvme: the same "
        "in files (--runtime.offload_dir), host memory caching what fits (docs/offload.md)"))
    activation_budget: float | None = field(default=None, metadata=_help(
        "compile only: fraction (0, 1] of the activations the compiler may keep"))
    loss_chunk: int | None = field(default=None, metadata=_help(
        "causal-LM loss: tokens per chunk (none: auto, 0: dense logits)"))
    packing: bool = field(default=False, metadata=_help(
        "true: several causal-LM examples per row, isolated by position ids"))
    pack_length: int | None = field(default=None, metadata=_help(
        "tokens per packed row (none: the micro-batch's longest)"))
    distributed: str = field(default="auto", metadata=_help(
        "under torchrun (docs/distributed.md)", choices=DISTRIBUTED))
    kernels: str = field(default="none", metadata=_help(
        "fused kernels: none | fused (petkit's low-rank delta) | triton (the same on petkit's "
        "Triton kernel) | liger (Liger Kernel's, --runtime.liger) | fused,liger | triton,liger "
        "| auto (what is installed and fits; CUDA only)"))
    liger: str = field(default="flce", metadata=_help(
        "Liger pieces for kernels=liger, comma-separated: flce, rmsnorm, rope, swiglu"))
    offload_dir: str | None = field(default=None, metadata=_help(
        "offload_optimizer=nvme: the folder (on the NVMe drive) for the optimiser state's files "
        "(none: the system's temporary folder, TMPDIR)"))
    activation_quantization: str = field(default="none", metadata=_help(
        "compile only: keep saved activations in fp8 (e4m3, one scale per tensor): none | fp8 "
        "(all) | fp8-mlp (the MLP's hidden activations only; docs/training-gpu.md)",
        choices=QUANTIZED_ACTIVATIONS))
    activation_quantization_min_mb: float = field(default=1.0, metadata=_help(
        "with activation_quantization: only saved activations of at least this many MiB"))
    activation_offload_fraction: float = field(default=1.0, metadata=_help(
        "with activation_offload: the fraction (0, 1] of the blocks whose saved activations "
        "go to host memory, evenly spread"))
    threads: int | None = field(default=None, metadata=_help(
        "CPU threads torch computes with during the run (None: torch's default, one per core); "
        "on a machine others share, fewer than its cores keeps them from slowing each other"))

    def __post_init__(self) -> None:
        """Validate every field and the combinations within this section."""
        ok = isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"))
        _check(ok, "device", "auto, cpu, cuda or cuda:N", self.device)
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        _check(self.delta_dtype in DELTA_DTYPES, "delta_dtype", f"one of {DELTA_DTYPES}",
               self.delta_dtype)
        for name in ("compile", "activation_offload", "packing"):
            _check(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        _check(self.compile_scope in COMPILE_SCOPES, "compile_scope", "model or blocks",
               self.compile_scope)
        self._check_memory()
        _check(self.offload_optimizer in OFFLOAD_MODES, "offload_optimizer",
               f"one of {OFFLOAD_MODES}", self.offload_optimizer)
        _check(self.offload_dir is None or (isinstance(self.offload_dir, str) and self.offload_dir
                                            and self.offload_optimizer == "nvme"),
               "offload_dir", "None, or a folder with offload_optimizer=nvme", self.offload_dir)
        _check(self.distributed in DISTRIBUTED, "distributed", f"one of {DISTRIBUTED}",
               self.distributed)
        _check(self.threads is None or (is_int(self.threads) and self.threads >= 1), "threads",
               "None or a whole number >= 1", self.threads)
        kernel_parts(self.kernels)  # ConfigError naming the flag
        liger_parts(self.liger)

    def _check_memory(self) -> None:
        mode = self.activation_checkpointing
        every = isinstance(mode, str) and mode.startswith("every-") and mode[6:].isdigit()
        _check(mode == "off" or mode in RECOMPUTE_MODES or (every and int(mode[6:]) >= 2),
               "activation_checkpointing", f"off, {', '.join(RECOMPUTE_MODES)} or every-K with "
               "K >= 2", mode)
        _check(not (self.activation_offload and self.compile and self.compile_scope == "model"),
               "activation_offload", "false when compile is true with compile_scope=model (one "
               "graph saves everything at its end, where no copy overlaps anything): use "
               "compile_scope=blocks", self.activation_offload)
        part = self.activation_offload_fraction
        _check(is_num(part) and 0 < part <= 1 and (part == 1 or self.activation_offload),
               "activation_offload_fraction", "a number in (0, 1], below 1 only with "
               "activation_offload=true", part)
        if self.activation_budget is not None:
            budget = self.activation_budget
            _check(is_num(budget) and 0 < budget <= 1 and budget - budget == 0,
                   "activation_budget", "None or a number in (0, 1]", budget)
            _check(self.compile and mode == "off", "activation_budget",
                   "None unless compile is true and activation_checkpointing is off (the "
                   "compiler chooses what to recompute)", budget)
        self._check_quantization()
        if self.loss_chunk is not None:
            _check(is_int(self.loss_chunk) and self.loss_chunk >= 0, "loss_chunk",
                   "None (auto), 0 (dense) or a number of tokens >= 1", self.loss_chunk)
        if self.pack_length is not None:
            _check(is_int(self.pack_length) and self.pack_length >= 2, "pack_length",
                   "None or an int >= 2", self.pack_length)

    def _check_quantization(self) -> None:
        kind = self.activation_quantization
        _check(kind in QUANTIZED_ACTIVATIONS, "activation_quantization",
               f"one of {QUANTIZED_ACTIVATIONS}", kind)
        least = self.activation_quantization_min_mb
        _check(is_num(least) and 0 <= least < float("inf"), "activation_quantization_min_mb",
               "a number of MiB >= 0", least)
        _check(kind == "none" or self.compile, "activation_quantization",
               "none unless compile is true (the compiler's partitioner quantizes what it saves)",
               kind)

    def compiles_blocks(self) -> bool:
        """Whether each transformer block is compiled (compile with compile_scope='blocks')."""
        return self.compile and self.compile_scope == "blocks"

    def checkpoint_every(self) -> int:
        """Every how many blocks activations are recomputed (0: off, 1: every block)."""
        mode = self.activation_checkpointing
        return 0 if mode == "off" else int(mode[6:]) if mode.startswith("every-") else 1

    def recompute_mode(self) -> str:
        """What a checkpointed block recomputes: full, selective or elementwise."""
        mode = self.activation_checkpointing
        return mode if mode in RECOMPUTE_MODES else "full"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RuntimeConfig:
        """Build from a mapping (None: defaults); unknown keys raise `ConfigError`."""
        return dataclass_from_dict(cls, data, "runtime")


_NAMES = tuple(f.name for f in dataclasses.fields(RuntimeConfig) if f.name != "offload_optimizer")
# the flat `TrainConfig` keys of earlier releases (deprecated); fields added since are only here
RUNTIME_FIELDS = _NAMES[:_NAMES.index("distributed") + 1]
