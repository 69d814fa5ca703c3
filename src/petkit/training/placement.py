"""Where and in which dtype a run trains: `RuntimeConfig.device`, `precision`, `delta_dtype`,
and with how many CPU threads (`threads`, `cpu_threads`).

`place` moves the model (in place) to the run's device and, for bf16 precision, stores the frozen
base weights in bf16 (not only autocast: half the weight memory) while the trainable deltas keep
`delta_dtype` (fp32 by default, so AdamW's updates are not lost to bf16 rounding). The forward
then runs under bf16 autocast, which casts the fp32 deltas' matmul inputs. Buffers keep their
dtype. Checkpoints and adapter files are device-independent: tensors are written from the CPU
and loaded onto whatever device the parameters are on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.training.runtime import RuntimeConfig


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch computes with `count` CPU threads inside (None: as it is); the count before is put
    back after."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (before any model loads); "auto" always fits."""
    if name != "auto":
        resolve_device(name, nn.Module())


def resolve_device(name: str, model: nn.Module) -> torch.device:
    """`name` as a device; "auto": the model's GPU, else cuda when available, else the CPU."""
    if name == "auto":
        current = next((p.device for p in model.parameters()), torch.device("cpu"))
        if current.type != "cpu":
            return current
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"RuntimeConfig.device (--device) is {name!r} but torch sees no CUDA "
                          f"device; set --device to cpu or auto")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ConfigError(f"RuntimeConfig.device is {name!r} but there are only "
                          f"{torch.cuda.device_count()} CUDA devices")
    return device


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 compute: asked for, or "auto" on a GPU that supports it (CPU "auto" stays fp32)."""
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def place(model: nn.Module, config: RuntimeConfig,
          trainable: dict[str, nn.Parameter]) -> torch.device:
    """Move `model` to the run's device; with bf16, frozen weights in bf16, deltas in
    `delta_dtype`. Returns the device."""
    device = resolve_device(config.device, model)
    model.to(device)
    if uses_bf16(config.precision, device):
        delta = torch.bfloat16 if config.delta_dtype == "bf16" else torch.float32
        own = {id(p) for p in trainable.values()}
        with torch.no_grad():
            for param in model.parameters():
                if not param.is_floating_point():
                    continue
                want = delta if id(param) in own else torch.bfloat16
                if param.dtype != want:
                    param.data = param.data.to(want)
    return device
