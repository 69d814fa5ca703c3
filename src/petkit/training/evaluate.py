"""`evaluate`: loss (and accuracy for classification) of a model on encoded examples."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from petkit.data import collate
from petkit.training.batching import CollateFn, Example, eval_batches, move
from petkit.training.objectives import Objective, make_objective


def format_metrics(metrics: dict[str, float]) -> str:
    """`accuracy=0.8123 loss=0.4021`: metrics as the CLI and run logs print them."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked for ("bf16", or "auto" on a GPU that supports it), else nothing.

    On CPU "auto" means fp32: CPU bf16 matmuls are rarely faster and lose accuracy.
    """
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_collate(collate_fn: CollateFn | None, pad_id: int) -> CollateFn:
    """`collate_fn`, or petkit's right-padding `collate` with `pad_id`."""
    if collate_fn is not None:
        return collate_fn
    return functools.partial(collate, pad_id=pad_id)


@torch.no_grad()
def run_objective(model: nn.Module, data: Sequence[Example], objective: Objective, *,
                  batch_size: int, collate: CollateFn, precision: str,
                  progress: str | None = None) -> dict[str, float]:
    """Mean loss over `data` (weighted by batch size) and accuracy when predictions exist.
    `progress`: the label of a progress bar, shown once the pass has taken a few seconds."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    loss_sum, correct, count, classified = 0.0, 0, 0, 0
    batches = tqdm(eval_batches(data, batch_size, collate), total=-(-len(data) // batch_size),
                   desc=progress, unit="batch", delay=3, leave=False, dynamic_ncols=True,
                   disable=progress is None)
    try:
        for batch in batches:
            with autocast(precision, device):
                out = objective(model, move(batch, device))
            n = len(batch["labels"])  # text (input_ids) or image (pixel_values) batches
            loss_sum, count = loss_sum + float(out.loss) * n, count + n
            if out.predictions is not None and out.targets is not None:
                correct += int((out.predictions == out.targets).sum())
                classified += len(out.targets)  # pair batches: one target per two rows
    finally:
        batches.close()
        model.train(was_training)
    metrics = {"loss": loss_sum / max(count, 1)}
    if classified:
        metrics["accuracy"] = correct / classified
    return metrics


def evaluate(model: nn.Module, data: Sequence[Example], *, batch_size: int = 16,
             collate_fn: CollateFn | None = None, pad_id: int = 0,
             label_token_ids: list[int] | None = None, precision: str = "auto",
             progress: str | None = None) -> dict[str, float]:
    """Evaluate `model` on encoded `data`: {"loss"} plus {"accuracy"} for classification.

    `label_token_ids` switches to verbaliser classification (a decoder's label-word logits);
    `progress` labels a progress bar shown when the pass takes more than a few seconds.
    """
    if len(data) == 0:
        return {}
    return run_objective(model, data, make_objective(label_token_ids), batch_size=batch_size,
                         collate=resolve_collate(collate_fn, pad_id), precision=precision,
                         progress=progress)
