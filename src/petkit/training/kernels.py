"""Which fused kernels a run uses (`--runtime.kernels`, `--runtime.liger`) and installing them.

    none            today's path: eager LoRA products, petkit's chunked loss
    fused           petkit's fused low-rank delta (`fused_delta`) on every layer that can take it
    triton          the same, computed by petkit's Triton kernel (`triton_delta`) where it takes
                    the layer, by the torch function elsewhere
    liger           Liger Kernel's pieces named by `--runtime.liger` (`liger`)
    fused,liger     both (likewise triton,liger)
    auto            what is installed, fits and measured faster: AUTO_LIGER (Liger's fused
                    linear cross-entropy), and the fused delta once AUTO_DELTA names a kernel that
                    beat the eager delta on a GPU (none has yet), on CUDA only

Rules: the fused delta runs on CUDA (`fused_delta.FUSED_DEVICES`); elsewhere the run keeps the
eager delta and says so. A missing Triton, a compute dtype other than bf16/fp16 or a rank the
kernel does not take keeps `triton`'s layers on the torch function, and the note says so.
`liger` is a clear error when liger-kernel (or triton) is missing, the device is not CUDA, the
model family is not one Liger's Llama kernels fit, or a piece finds nothing to replace; `auto`
turns each of those into a logged fallback. `KernelPlan.note()` is
the line the run logs and keeps in `TrainResult.report["kernels"]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError, MissingPackageError, did_you_mean
from petkit.training import fused_delta
from petkit.training.liger import (FAMILIES, PIECES, PIP, Provider, applicable, family,
                                   liger_pieces, model_type, liger_provider)

KERNELS = ("none", "auto", "fused", "triton", "liger")
AUTO_LIGER = ("flce",)  # auto's Liger pieces: the ones measured to win next to compile
# what computes auto's fused delta (fused_delta.DELTA_KERNELS), None: auto keeps the eager delta.
# Measured on an H100 (2026-12-06, benchmarks/gpu_train.py, 1.1B shape, compiled blocks +
# selective recompute; docs/training-gpu.md): eager 57,495 tok/s, torch fused 56,903 (0.99x),
# Triton 43,690 (0.76x); Liger's flce 61,369 (1.07x; 8B 1.11x): so auto is flce alone.
AUTO_DELTA: str | None = None


def kernel_parts(value: str) -> tuple[str, ...]:
    """`--runtime.kernels` as its parts; `ConfigError` for an unknown one."""
    parts = tuple(p.strip() for p in str(value).split(",") if p.strip())
    for part in parts:
        if part not in KERNELS:
            raise ConfigError(f"--runtime.kernels: unknown {part!r}{did_you_mean(part, KERNELS)}; "
                              f"use none, auto, fused, triton, liger, fused,liger or triton,liger")
    alone = [p for p in parts if p in ("none", "auto")]
    if not parts or (alone and len(parts) > 1) or {"fused", "triton"} <= set(parts):
        raise ConfigError(f"--runtime.kernels must be none, auto, or fused and/or liger "
                          f"(comma-separated; triton in place of fused), got {value!r}")
    return () if parts == ("none",) else parts


def liger_parts(value: str) -> tuple[str, ...]:
    """`--runtime.liger` as its pieces; `ConfigError` for an unknown or empty list."""
    parts = tuple(p.strip() for p in str(value).split(",") if p.strip())
    if not parts:
        raise ConfigError(f"--runtime.liger must name pieces from {', '.join(PIECES)}, "
                          f"got {value!r}")
    for part in parts:
        if part not in PIECES:
            raise ConfigError(f"--runtime.liger: unknown piece {part!r}"
                              f"{did_you_mean(part, PIECES)}; choose from {', '.join(PIECES)}")
    return parts


@dataclass
class KernelPlan:
    """What a run will install: the fused delta or not, Liger's pieces, and why not the rest."""

    fused: bool = False
    kernel: str = "torch"  # what computes the fused delta (fused_delta.DELTA_KERNELS)
    liger: tuple[str, ...] = ()
    provider: Provider | None = None
    notes: list[str] = field(default_factory=list)
    delta: str = ""  # what the fused delta did, once installed

    def note(self) -> str:
        """Which path ran, for the run's log line and `TrainResult.report["kernels"]`."""
        parts = [self.delta or ("fused delta" if self.fused else "eager delta")]
        if self.liger:
            parts.append(f"liger {','.join(self.liger)}")
        elif not any(n.startswith("liger off") for n in self.notes):  # else the note says why
            parts.append("liger off")
        return "; ".join(parts + self.notes)

    @contextlib.contextmanager
    def installed(self, model: nn.Module, bypass: Any | None,
                  dtype: torch.dtype) -> Iterator[KernelPlan]:
        """The planned kernels on `model` for the context (compute dtype `dtype`)."""
        with contextlib.ExitStack() as stack:
            if self.fused:
                self.delta = stack.enter_context(fused_delta.fused_deltas(
                    model, dtype, kernel=self.kernel)).note()
            if "flce" in self.liger and bypass is None:  # the run dropped the chunked loss
                self.liger = tuple(p for p in self.liger if p != "flce")
                self.notes.append("liger flce off (the run computes its loss another way)")
            if self.liger:
                assert self.provider is not None
                stack.enter_context(liger_pieces(model, self.liger, self.provider, bypass))
            yield self


def _liger_unavailable(device: torch.device) -> Exception | None:
    """Why Liger cannot run here (None: it can): device, package."""
    if device.type != "cuda":
        return ConfigError(f"--runtime.kernels=liger needs a CUDA device (Liger's kernels are "
                           f"Triton), the run is on {device.type}")
    missing = [m for m in ("liger_kernel", "triton") if find_spec(m) is None]
    if missing:
        return MissingPackageError(f"--runtime.kernels=liger needs {' and '.join(missing)}. "
                                   f"Fix: {PIP}")
    return None


def _unfit_family(model: nn.Module) -> ConfigError | None:
    if family(model) is not None:
        return None
    return ConfigError(f"--runtime.kernels=liger supports the {', '.join(FAMILIES)} families, "
                       f"not {model_type(model)!r}")


def plan_kernels(kernels: str, liger: str, model: nn.Module, device: torch.device,
                 bypass: Any | None, provider: Provider | None = None) -> KernelPlan:
    """Resolve `--runtime.kernels` / `--runtime.liger` for this model and device (module
    docstring's rules). `provider` replaces Liger's functions (tests)."""
    parts = kernel_parts(kernels)
    auto = "auto" in parts
    plan = KernelPlan(fused=(auto and AUTO_DELTA is not None) or "fused" in parts or "triton" in parts,
                      kernel=(AUTO_DELTA or "torch") if auto else "triton" if "triton" in parts else "torch")
    devices = fused_delta.FUSED_DEVICES
    if plan.fused and device.type not in devices:
        plan.fused = False
        plan.notes.append(f"fused delta off on {device.type} (it runs on {', '.join(devices)})")
    if not (auto or "liger" in parts):
        return plan
    problem = (None if provider is not None else _liger_unavailable(device)) \
        or _unfit_family(model)
    if problem is not None:
        if not auto:
            raise problem
        plan.notes.append(f"liger off ({problem})")
        return plan
    pieces = AUTO_LIGER if auto else liger_parts(liger)
    unfit = {p: applicable(model, p, bypass) for p in pieces}
    if not auto:
        for piece, reason in unfit.items():
            if reason is not None:
                raise ConfigError(f"--runtime.liger={piece}: {reason}")
    pieces = tuple(p for p in pieces if unfit[p] is None)
    plan.notes.extend(f"liger {p} off ({unfit[p]})" for p in unfit if unfit[p] is not None)
    if pieces:
        plan.liger, plan.provider = pieces, provider or liger_provider()
    return plan
