"""Data-driven initialisation: `pk.initialize(model, batches)` after `attach`, before training.

    pk.attach(model, pk.LoraConfig(r=8, init="eva"))
    pk.initialize(model, batches[:4])          # a few batches: dicts for model(**batch)
    pk.train(model, ...)                        # the CLI's train does both (--method.init eva)

Some initialisations (EVA, CorDA, LoRA-GA) start from statistics of the base model on a few
batches. Their wrappers are `DataInitialized` (core.capabilities): each says what it needs —
"inputs" (sum of x x^T and of x over the non-padding tokens reaching it) or "weight_grad" (the
mean gradient of the loss with respect to its base weight) — and this module collects it in one
pass over the batches with the adapter contributing nothing (B = 0 until initialised), then hands
each wrapper its statistics. Nothing else of the model changes: gradients and `requires_grad` of
the base are restored.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .capabilities import DataInitialized, InitStats
from .delta import DeltaModule, innermost
from .errors import ConfigError
from .qweight import is_quantized_weight
from .state import check_known, wrappers_of


def pending(model: nn.Module, name: str = "default") -> list[tuple[str, DeltaModule]]:
    """Adapter `name`'s wrappers still waiting for data (empty when nothing needs `initialize`)."""
    return [(p, w) for p, w in wrappers_of(model, [name]) if isinstance(w, DataInitialized) and w.init_needs]


Loss = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def _model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)  # a transformers ModelOutput is a Mapping
    loss = out.get("loss") if isinstance(out, Mapping) else None
    if loss is None:
        raise ConfigError("--method.init lora-ga needs batches with labels (the model must return a loss)")
    return loss


def initialize(model: nn.Module, batches: Iterable[Mapping[str, Any]], name: str = "default",
               loss: Loss = _model_loss) -> nn.Module:
    """Give adapter `name`'s data-driven initialisation its statistics from `batches`; `loss`
    (model, batch) -> scalar is what LoRA-GA differentiates (default: the model's own loss)."""
    check_known(model, [name])
    todo = pending(model, name)
    if not todo:
        raise ConfigError(f"adapter {name!r} has no data-driven initialisation waiting "
                          "(--method.init eva|corda|lora-ga on a freshly attached LoRA)")
    if any(w.init_needs not in ("inputs", "weight_grad") for _, w in todo):
        raise ConfigError(f"adapter {name!r} waits for pk.loftq(model, 'nf4'): LoftQ quantises the base before "
                          "training (petkit train --method.init loftq runs it)")
    batches = list(batches)
    if not batches:
        raise ConfigError("initialize needs at least one batch")
    sums: dict[str, list[Any]] = {p: [None, None, 0] for p, w in todo if w.init_needs == "inputs"}
    grads = {p: w for p, w in todo if w.init_needs == "weight_grad"}
    counts = _run(model, batches, {p: w for p, w in todo if p in sums}, sums, grads, loss)
    for path, w in todo:
        if path in sums:
            xtx, xsum, count = sums[path]
            w.init_from(InitStats(xtx=xtx, xsum=xsum, count=count))
        else:
            w.init_from(InitStats(grad=counts[path]))
    return model


def _mask(batch: Mapping[str, Any], x: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == x.shape[:-1]:
        return mask.bool()
    return None


def _run(model: nn.Module, batches: list[Mapping[str, Any]], hooked: dict[str, DeltaModule],
         sums: dict[str, list[Any]], grads: dict[str, DeltaModule], loss: Loss) -> dict[str, torch.Tensor]:
    """One pass: input sums into `sums`, mean weight gradients returned (by path)."""
    current: dict[str, Any] = {}

    def hook(path: str):
        def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = _mask(current, x)
            rows = (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).double()
            acc = sums[path]
            acc[0] = rows.T @ rows if acc[0] is None else acc[0] + rows.T @ rows
            acc[1] = rows.sum(0) if acc[1] is None else acc[1] + rows.sum(0)
            acc[2] += rows.shape[0]
        return collect

    handles = [w.register_forward_pre_hook(hook(p)) for p, w in hooked.items()]
    weights = {p: innermost(w).weight for p, w in grads.items()}
    for path, weight in weights.items():
        if is_quantized_weight(weight) or not weight.is_floating_point():
            raise ConfigError(f"{path}: --method.init lora-ga needs a full-precision base weight (quantise after)")
    flags = {p: w.requires_grad for p, w in weights.items()}
    untouched = [q for q in model.parameters() if q.grad is None]  # the adapter's own grads stay empty
    was_training = model.training
    model.eval()
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
            weight.grad = None
        for batch in batches:
            current.clear()
            current.update(batch)
            if weights:
                with torch.enable_grad():
                    loss(model, batch).backward()
            else:  # inputs only: no labels, which a verbaliser's batch holds as class ids
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
        return {p: w.grad.detach() / len(batches) for p, w in weights.items()}
    finally:
        for h in handles:
            h.remove()
        for q in untouched:
            q.grad = None
        for path, weight in weights.items():
            weight.requires_grad_(flags[path])
        model.train(was_training)

