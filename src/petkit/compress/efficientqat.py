"""EfficientQAT — Chen et al., 2024, "EfficientQAT: Efficient Quantization-Aware Training for Large
Language Models" (arXiv:2407.11062), its first stage Block-AP; E2E-QP is PEQA on the result.

    Block-AP, for each transformer block i in order (memory: one block + its calibration activations):
        Y   = block_fp(X_fp)                      the full-precision block on full-precision inputs
        W_q = s ⊙ (clamp(⌊W/s⌉ + ⌊z⌉, 0, 2^b-1) - ⌊z⌉)   per group of `group_size` inputs of a row
        min over W, s, z of  || block_q(X_q) - Y ||²   (⌊·⌉ straight-through; AdamW, cosine to lr/20)
        then freeze: integers Q, zero points ⌊z⌉, scales s; X_q <- block_q(X_q), X_fp <- Y
    E2E-QP: only the step sizes s train, end to end on the task: `petkit train --method peqa` on the
        quantised model (PEQA takes the model's own integers, `core.qweight.integer_grid`); or, before
        saving, on the calibration windows themselves (`e2e_steps`, next-token loss: `e2e_qp`).

The frozen layers are stored the way compressed-tensors describes them (`petkit.compress.qformat`):
an `nn.Linear` whose `weight` is exactly s ⊙ (Q - z), with `weight_scale` / `weight_zero_point`
beside it, so the in-memory model, the saved folder and its `from_pretrained` reload are one thing.
Block-AP is a calibration loop per block (like GPTQ's), not a training run: it sees no task and
no labels. RTN (round-to-nearest min/max, `methods.peqa.rtn_quantize`) is its initialisation and
the baseline it is compared with. A group size that does not divide a layer's inputs leaves a
shorter last group, quantised on its own (`pad_groups`), as GPTQ's `column // group` does.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petkit.core.blocks import layer_paths
from petkit.core.errors import ConfigError
from petkit.core.registry import check_range
from petkit.methods.peqa import rtn_quantize


@dataclass(frozen=True)
class QatConfig:
    """Block-AP settings (`petkit quantize --method efficientqat` flags of the same names)."""

    bits: int = 4
    group_size: int = 128
    epochs: int = 2          # passes over the calibration samples per block
    batch_size: int = 4
    # The paper uses 2e-5 / 1e-4 over 4,096 windows of 2,048 tokens; with a CPU's few windows
    # (16 steps a block) 1e-4 / 1e-3 fit better: chosen on held-out calibration windows of the
    # train split (docs/compressed.md, "Block-AP's learning rates").
    lr_weight: float = 1e-4  # weights
    lr_quant: float = 1e-3   # scales and zero points
    seed: int = 0
    # E2E-QP of the step sizes on the calibration windows after Block-AP (0: none). On
    # SmolLM2-135M int4 g128, 32 steps at 1e-4 took the validation perplexity from 54.8 to 45.9
    # (3e-5: 49.7, 3e-4: 47.8; docs/compressed.md, "Closing the int4 gap").
    e2e_steps: int = 32
    e2e_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_range("--bits", self.bits, 2, 8, kind=int)
        check_range("--group-size", self.group_size, 1, kind=int)
        check_range("--epochs", self.epochs, 0, kind=int)
        check_range("--batch-size", self.batch_size, 1, kind=int)
        check_range("--lr-weight", self.lr_weight, 0.0)
        check_range("--lr-quant", self.lr_quant, 0.0)
        check_range("--e2e-steps", self.e2e_steps, 0, kind=int)
        check_range("--e2e-lr", self.e2e_lr, 0.0)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def pad_groups(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The (out, in) weight with zero columns appended up to a multiple of `group`.

    A group size that does not divide a layer's inputs (128 on SmolLM2's 576) leaves a shorter
    last group (576 = 4 x 128 + 64). Zeros do not move that group's min / max (the grid always
    holds 0) and quantise to exactly 0, so padding = quantising the short group on its own.
    """
    return F.pad(weight, (0, -weight.shape[1] % group))


def padded_rtn(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest min/max of `weight` in groups of `group` inputs, a short last group allowed."""
    return rtn_quantize(pad_groups(weight.detach().float(), group), bits, group)


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, inputs: int) -> torch.Tensor:
    """s ⊙ (Q - z) as an (out, inputs) weight (the padding columns of a short last group dropped)."""
    dense = scales[..., None] * (codes.float() - zeros.float()[..., None])
    return dense.reshape(dense.shape[0], -1)[:, :inputs]


class FakeQuantLinear(nn.Module):
    """A linear layer being fitted by Block-AP: weight, scales and zero points all train."""

    def __init__(self, linear: nn.Linear, bits: int, group: int) -> None:
        super().__init__()
        self.qmax, self.group = 2**bits - 1, group
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = linear.bias
        _codes, zeros, scales = padded_rtn(self.weight, bits, group)
        self.scales = nn.Parameter(scales)
        self.zeros = nn.Parameter(zeros.float())

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (out, groups, group) in [0, qmax], integer zero points, scales), differentiable (STE)."""
        w = pad_groups(self.weight, self.group).reshape(self.weight.shape[0], -1, self.group)
        scales = self.scales.clamp(min=1e-8)
        zeros = _round_ste(self.zeros).clamp(0, self.qmax)
        codes = torch.clamp(_round_ste(w / scales[..., None]) + zeros[..., None], 0, self.qmax)
        return codes, zeros, scales

    def quantized_weight(self) -> torch.Tensor:
        return dequantize(*self.grid(), self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


def block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor,
                 batch_size: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The hidden states (and keyword arguments: masks, rotary embeddings) entering the first block."""
    states: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def grab(_module: nn.Module, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw.pop("hidden_states")
        states.append(hidden.detach())
        kwargs.append({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values",
                                                               "past_key_value", "use_cache")})
        raise _Stop

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                try:
                    model(input_ids=ids[start:start + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return states, kwargs


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _swap(block: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, new)


def cosine_to(steps: int, floor: float = 1 / 20) -> Callable[[int], float]:
    """The paper's per-block schedule: cosine from each rate down to rate / 20 over the block's steps."""
    def factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    return factor


def fit_block(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
              kwargs: list[dict[str, Any]], config: QatConfig) -> dict[str, tuple]:
    """Block-AP on one block; returns {linear path: (codes, zeros, scales)}, the block unchanged."""
    originals = _linears(block)
    fakes = {p: FakeQuantLinear(m, config.bits, config.group_size) for p, m in originals.items()}
    for path, fake in fakes.items():
        _swap(block, path, fake)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW([
        {"params": [f.weight for f in fakes.values()], "lr": config.lr_weight},
        {"params": [t for f in fakes.values() for t in (f.scales, f.zeros)], "lr": config.lr_quant},
    ], weight_decay=0.0)
    for f in fakes.values():
        for t in (f.weight, f.scales, f.zeros):
            t.requires_grad_(True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, cosine_to(config.epochs * len(inputs)))
    generator = torch.Generator().manual_seed(config.seed)
    with torch.enable_grad():
        for _ in range(config.epochs):
            for i in torch.randperm(len(inputs), generator=generator).tolist():
                loss = F.mse_loss(_run(block, inputs[i], kwargs[i]).float(), targets[i].float())
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
    with torch.no_grad():
        grids = {p: tuple(t.detach() for t in f.grid()) for p, f in fakes.items()}
    for path, linear in originals.items():
        _swap(block, path, linear)
    for p in frozen:
        p.requires_grad_(True)
    return grids


def rtn_grids(block: nn.Module, config: QatConfig) -> dict[str, tuple]:
    """The round-to-nearest grids of a block's linear layers (Block-AP's start, and the baseline)."""
    grids = {}
    for path, linear in _linears(block).items():
        codes, zeros, scales = padded_rtn(linear.weight, config.bits, config.group_size)
        grids[path] = (codes.float(), zeros.float(), scales)
    return grids


def set_grid(linear: nn.Linear, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> None:
    """Write s ⊙ (Q - z) into the layer's weight (in its dtype)."""
    dense = dequantize(codes, zeros, scales, linear.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(dense.to(linear.weight.dtype))

def block_ap(model: nn.Module, calibration: torch.Tensor, config: QatConfig,
             progress: Callable[[int, int, float], None] | None = None) -> dict[str, tuple]:
    """Quantise every linear layer of every block of `model` in place; returns {model path: grid}.

    `calibration`: (samples, tokens) token ids. `progress(block, blocks, mse)` after each block,
    with the block's output MSE against the full-precision block.
    """
    stack = layer_paths(model)
    if not stack:
        raise ConfigError("efficientqat needs a model made of repeated transformer blocks")
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    fp_in, kwargs = block_inputs(model, model.get_submodule(stack[0]), calibration, config.batch_size)
    q_in = fp_in
    grids: dict[str, tuple] = {}
    for index, path in enumerate(stack):
        block = model.get_submodule(path)
        with torch.no_grad():
            targets = [_run(block, x, kw) for x, kw in zip(fp_in, kwargs)]
        found = fit_block(block, q_in, targets, kwargs, config) if config.epochs else rtn_grids(block, config)
        for sub, grid in found.items():
            set_grid(block.get_submodule(sub), *grid)
            grids[f"{path}.{sub}"] = grid
        with torch.no_grad():
            q_in = [_run(block, x, kw) for x, kw in zip(q_in, kwargs)]
        if progress is not None:
            mse = sum(F.mse_loss(a, b).item() for a, b in zip(q_in, targets)) / len(targets)
            progress(index + 1, len(stack), mse)
        fp_in = targets
    model.train(was_training)
    return grids


class GridLinear(nn.Module):
    """A frozen integer layer during E2E-QP: codes and zero points fixed, only the step sizes train."""

    def __init__(self, linear: nn.Linear, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.float())
        self.register_buffer("zeros", zeros.float())
        self.scales = nn.Parameter(scales.detach().float().clone())
        self.bias, self.inputs = linear.bias, linear.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.codes, self.zeros, self.scales.clamp(min=1e-8), self.inputs)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def e2e_qp(model: nn.Module, grids: dict[str, tuple], calibration: torch.Tensor,
           config: QatConfig) -> dict[str, tuple]:
    """E2E-QP on the calibration windows: only the step sizes train, end to end, on the next-token
    loss (AdamW, cosine to lr / 20, `batch_size` windows a step); the integers stay. Returns the
    grids with the trained scales, written into the model's layers."""
    trainable, was_training = [p for p in model.parameters() if p.requires_grad], model.training
    for p in trainable:
        p.requires_grad_(False)
    model.eval()  # no dropout: the loss the step sizes see is the quantised model's own
    originals = {path: model.get_submodule(path) for path in grids}
    layers = {path: GridLinear(originals[path], *grid) for path, grid in grids.items()}
    for path, layer in layers.items():
        _swap(model, path, layer)
    optimiser = torch.optim.AdamW([layer.scales for layer in layers.values()], lr=config.e2e_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, cosine_to(config.e2e_steps))
    generator, order = torch.Generator().manual_seed(config.seed), []
    with torch.enable_grad():
        for _ in range(config.e2e_steps):
            order = order or torch.randperm(len(calibration), generator=generator).tolist()
            ids = calibration[[order.pop() for _ in range(min(config.batch_size, len(order)))]]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    trained = {}
    for path, layer in layers.items():
        _swap(model, path, originals[path])
        trained[path] = (layer.codes, layer.zeros, layer.scales.detach().clamp(min=1e-8))
        set_grid(originals[path], *trained[path])
    for p in trainable:
        p.requires_grad_(True)
    model.train(was_training)
    return trained


INT_MODES = {"int4": 4, "int3": 3, "int2": 2}
INT_METHODS = ("efficientqat", "rtn")


def quantize_int(model: nn.Module, mode: str = "int4", *, method: str = "efficientqat",
                 calibration: torch.Tensor | None = None, group_size: int = 128, epochs: int = 2,
                 batch_size: int = 4, lr_weight: float = 1e-4, lr_quant: float = 1e-3, seed: int = 0,
                 e2e_steps: int = QatConfig.e2e_steps, e2e_lr: float = QatConfig.e2e_lr,
                 progress: Callable[[int, int, float], None] | None = None) -> nn.Module:
    """`pk.quantize(model, "int4", method="efficientqat", calibration=ids)`: Block-AP (or plain RTN
    with method="rtn") of every block's linear layers, in place, in the compressed-tensors layout;
    `e2e_steps` > 0: then E2E-QP of the step sizes on the same calibration windows (`e2e_qp`)."""
    from petkit.compress.qformat import attach_scheme

    if mode not in INT_MODES:
        raise ConfigError(f"--bits must be one of {', '.join(INT_MODES)} for --method {method}, got {mode!r}")
    if method not in INT_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(INT_METHODS)}, got {method!r}")
    qat = method == "efficientqat"
    config = QatConfig(INT_MODES[mode], group_size, epochs if qat else 0, batch_size, lr_weight,
                       lr_quant, seed, e2e_steps if qat else 0, e2e_lr)
    if qat and calibration is None:
        raise ConfigError("efficientqat needs calibration token ids (calibration=, a (samples, tokens) tensor)")
    if calibration is None:  # RTN needs no data: one dummy token runs the block walk
        calibration = torch.zeros(1, 2, dtype=torch.long)
    grids = block_ap(model, calibration, config, progress)
    if config.e2e_steps:
        grids = e2e_qp(model, grids, calibration, config)
    attach_scheme(model, grids, config.bits, group_size)
    return model
