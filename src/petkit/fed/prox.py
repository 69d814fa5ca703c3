"""FedProx's proximal term (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

Each client minimises  F_k(w) + (mu / 2) ||w - w_global||^2  over the shared delta. Its gradient
is  grad F_k(w) + mu (w - w_global);  we add the second part with a gradient hook on each shared
parameter, so any backprop stepper of `petkit.training` gets FedProx without knowing about it.
With gradient accumulation over k micro-batches the hook runs k times per step, so each adds 1/k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def proximal(params: Mapping[str, nn.Parameter], anchor: Mapping[str, torch.Tensor], mu: float,
             accumulation: int = 1) -> Iterator[None]:
    """Inside: every backward adds mu * (p - anchor) / accumulation to each parameter's gradient."""
    if mu == 0:
        yield
        return
    handles = []
    for key, param in params.items():
        ref = anchor[key].detach().to(param.device, param.dtype)

        def hook(grad: torch.Tensor, p: nn.Parameter = param, r: torch.Tensor = ref) -> torch.Tensor:
            return grad + (mu / accumulation) * (p.detach() - r)

        handles.append(param.register_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def proximal_penalty(params: Mapping[str, nn.Parameter], anchor: Mapping[str, torch.Tensor],
                     mu: float) -> torch.Tensor:
    """(mu / 2) sum ||p - anchor||^2 (for logging and for checking the hooks)."""
    total = sum(((p - anchor[k].to(p.device, p.dtype)) ** 2).sum() for k, p in params.items())
    return 0.5 * mu * torch.as_tensor(total)
