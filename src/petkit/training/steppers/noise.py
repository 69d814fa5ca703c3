"""Pieces the derivative-free steppers share: seeded noise, repeatable randomness, mean loss.

`SeededNoise` regenerates z ~ N(0, I) over a fixed list of parameters from an integer seed, one
parameter-sized tensor at a time, so a zeroth-order step never holds the whole direction in memory
(MeZO's trick) and a log of seeds is enough to redo it. `RngSnapshot` lets two forward passes of
one estimate see the same dropout masks, so their difference measures the perturbation only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.training.steppers.base import Batch, LossFn


def step_seed(base: int, step: int, index: int) -> int:
    """The seed of perturbation `index` of step `step` in a run seeded with `base` (< 2**63)."""
    words = np.random.SeedSequence([base, step, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def require_parameters(params: dict[str, nn.Parameter], who: str) -> list[nn.Parameter]:
    """The parameters as a list; `ConfigError` when there are none or one is not floating point."""
    if not params:
        raise ConfigError(f"{who}: the model has no trainable parameters; attach a method first "
                          "(pk.attach(model, pk.make_config('lora')))")
    bad = [name for name, p in params.items() if not p.is_floating_point()]
    if bad:
        raise ConfigError(f"{who}: trainable parameters must be floating point, not {bad[:3]}")
    return list(params.values())


def parameters_sha256(params: Sequence[torch.Tensor]) -> str:
    """Hash of the parameters' values in order (to check a replay starts where the run did)."""
    digest = hashlib.sha256()
    for p in params:
        flat = p.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SeededNoise:
    """z ~ N(0, I) shaped like `params`, a pure function of a seed (one generator per device)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        """Noise over `params`, drawn in list order."""
        self.params = list(params)

    def stream(self, seed: int) -> Iterator[torch.Tensor]:
        """The direction for `seed`, one tensor per parameter, in order."""
        generators: dict[torch.device, torch.Generator] = {}
        for p in self.params:
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            yield torch.randn(p.shape, generator=generators[p.device], device=p.device,
                              dtype=p.dtype)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """In place: p += scale * z(seed)."""
        for p, z in zip(self.params, self.stream(seed)):
            p.add_(z, alpha=scale)


class RngSnapshot:
    """The global torch RNG state now (CPU and initialised CUDA devices), to replay it later."""

    def __init__(self) -> None:
        """Capture the current state."""
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None

    def restore(self) -> None:
        """Put the captured state back: the next forward draws the same dropout masks."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def mean_loss(micro_batches: Sequence[Batch], loss_fn: LossFn) -> float:
    """Mean of `loss_fn` over the step's micro-batches (forward passes only)."""
    with torch.no_grad():
        return sum(float(loss_fn(batch)) for batch in micro_batches) / len(micro_batches)
