"""Importance of weights from LoRA gradients only, and the cubic sparsity schedule.

LoRAPrune (Zhang et al., 2024) estimates the gradient of a frozen weight W = W0 + s B A from the
gradients of its low-rank factors, which training computes anyway:

    G ~ s (dL/dB A + B dL/dA)            (out, in), built per step as a temporary
    I = |(W0 + s B A) ⊙ G|               first-order Taylor estimate of the loss change
    group importance = sum of I over the group's rows / columns;  I_t = b I_{t-1} + (1-b) I_now

The factors' gradients are copied by a post-accumulate hook (r x (in + out) numbers per layer);
no gradient of W0 is ever requested or stored (W0 has requires_grad False throughout).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from petkit.core.capabilities import LowRank
from petkit.core.delta import DeltaModule, get_canonical, innermost
from petkit.core.errors import TargetError
from petkit.core.qweight import dense_weight


def cubic_sparsity(step: int, total: int, target: float, start: float, end: float) -> float:
    """Zhu & Gupta's cubic schedule: 0 before `start`, `target` after `end` (fractions of `total`)."""
    t0, t1 = start * total, max(end * total, start * total + 1)
    if step <= t0:
        return 0.0
    if step >= t1:
        return target
    return target * (1 - (1 - (step - t0) / (t1 - t0)) ** 3)


def lowrank_wrapper(model: nn.Module, path: str) -> DeltaModule | None:
    """The LoRA-family wrapper (LowRank capability) stacked at `path`, if any."""
    module = get_canonical(model, path)
    while isinstance(module, DeltaModule):
        if isinstance(module, LowRank):
            return module
        module = module.base
    return None


class GradStash:
    """Copies of the LoRA factors' gradients, taken as backward accumulates them."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def watch(self, param: nn.Parameter) -> None:
        def keep(p: torch.Tensor) -> None:
            if p.grad is not None:
                self.grads[id(p)] = p.grad.detach().clone()

        self.handles.append(param.register_post_accumulate_grad_hook(keep))

    def pop(self, param: nn.Parameter) -> torch.Tensor | None:
        return self.grads.pop(id(param), None)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.grads.clear()


def weight_importance(wrapper: DeltaModule, stash: GradStash) -> torch.Tensor | None:
    """|W ⊙ G| (out, in) of one LoRA-wrapped linear from its factors' stashed gradients."""
    a, b, scale = wrapper.lowrank()
    ga, gb = stash.pop(a), stash.pop(b)
    if ga is None or gb is None:
        return None
    with torch.no_grad():
        g = scale * (gb @ a.detach() + b.detach() @ ga)
        w0 = dense_weight(innermost(wrapper.base), torch.float32)
        if getattr(wrapper, "transposed", False):
            w0 = w0.T
        return ((w0 + scale * (b.detach() @ a.detach())).float() * g.float()).abs()


def watch_layer(model: nn.Module, paths: tuple[str, ...], stash: GradStash) -> dict[str, DeltaModule]:
    """Hook the LoRA factors at `paths`; {path: wrapper}. Raises if none of them carries a LoRA."""
    found = {}
    for path in paths:
        wrapper = lowrank_wrapper(model, path)
        if wrapper is not None:
            a, b, _ = wrapper.lowrank()
            stash.watch(a)
            stash.watch(b)
            found[path] = wrapper
    if not found:
        raise TargetError(f"pruning reads importance from LoRA gradients, but none of {list(paths)} has a "
                          "LoRA-family adapter: attach one with targets='all-linear' first")
    return found


def floor_count(fraction: float, n: int) -> int:
    return max(0, min(n - 1, math.floor(fraction * n + 1e-9)))
