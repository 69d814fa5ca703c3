"""A run's device and speed/memory modes, set up once for the loop (docs/training-gpu.md).

`RunModes` places the model (`placement`), picks the loss (`lm_loss`: chunked for causal LMs
unless `loss_chunk=0`), wraps the forward + loss in `torch.compile` (or compiles each transformer
block, `compile_scope="blocks"`) and/or activation offload, and installs activation
checkpointing, the head bypass and the fused kernels (`kernels`) for the duration of the loop.
`packed_collate` turns `packing=true` into the collate function.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.training.activation_offload import ActivationOffload
from petkit.training.activations import (activation_checkpointing, block_modules, compiled_blocks,
                                         has_extensions, memory_budget, quantized_activations)
from petkit.training.batching import Batch, CollateFn
from petkit.training.kernels import KernelPlan, plan_kernels
from petkit.training.runtime import RuntimeConfig
from petkit.training.shared_input import shared_input_lowrank
from petkit.training.lm_loss import HeadBypass, can_bypass
from petkit.training.objectives import Objective, make_objective
from petkit.training.packing import pack
from petkit.training.placement import place, resolve_device, uses_bf16

# compiled graphs form the rank-r products of LoRA layers that share an input as one GEMM
# (`shared_input`): measured faster on an H100 (docs/training-gpu.md, "The B-product in place");
# `benchmarks/gpu_train.py`'s `-copy` and `-inplace` cases turn it off
SHARED_INPUT_LOWRANK = True

LossFn = Callable[[Batch], torch.Tensor]


def packed_collate(runtime: RuntimeConfig, collate_fn: CollateFn | None, pad_id: int,
                   label_token_ids: list[int] | None) -> CollateFn | None:
    """The packing collate when `runtime.packing`, else None."""
    if not runtime.packing:
        return None
    if collate_fn is not None:
        raise ConfigError("RuntimeConfig.packing builds its own batches: pass no collate_fn")
    if label_token_ids is not None:
        raise ConfigError("RuntimeConfig.packing is for causal-LM / instruction data, not "
                          "verbaliser classification (label_token_ids)")
    return functools.partial(pack, length=runtime.pack_length, pad_id=pad_id)


def _optional_mask(model: nn.Module) -> bool:
    """Whether `model.forward` takes `attention_mask` with a default (Hugging Face models do)."""
    try:
        param = inspect.signature(model.forward).parameters.get("attention_mask")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is not inspect.Parameter.empty


def _bypass(model: nn.Module, config: RuntimeConfig) -> HeadBypass | None:
    """The chunked loss's head bypass, for a causal LM unless `loss_chunk=0`."""
    use = config.loss_chunk != 0 and can_bypass(model)
    return HeadBypass(model, config.loss_chunk or None) if use else None


def check_modes(model: nn.Module, config: RuntimeConfig) -> None:
    """`ConfigError` for a mode this model cannot run (checked before anything is moved)."""
    device = resolve_device(config.device, model)
    plan_kernels(config.kernels, config.liger, model, device, _bypass(model, config))
    if config.packing and has_extensions(model):
        raise ConfigError("RuntimeConfig.packing cannot isolate examples when a method adds "
                          "virtual tokens or key/value prefixes (prompt / prefix family)")
    if config.checkpoint_every() or config.compiles_blocks():
        block_modules(model)  # ConfigError when the model has no block stack


class RunModes:
    """Device, precision, loss, compile, checkpointing and offload of one run."""

    def __init__(self, model: nn.Module, config: RuntimeConfig, params: dict[str, nn.Parameter],
                 label_token_ids: list[int] | None) -> None:
        """Place the model now; the rest is installed by `installed` / applied by `wrap`."""
        check_modes(model, config)
        self.model, self.config, self.label_token_ids = model, config, label_token_ids
        self.device = place(model, config, params)
        self.bypass = _bypass(model, config)
        self.mask_optional = _optional_mask(model)
        self.kernels: KernelPlan = plan_kernels(config.kernels, config.liger, model, self.device,
                                                self.bypass)
        self.offload = (ActivationOffload(model, config.activation_offload_fraction)
                        if config.activation_offload else None)

    def trim(self, batch: Batch) -> Batch:
        """The CPU batch without an all-ones attention mask when the model computes the loss and
        its forward takes the mask as optional: attention then takes the plain causal path (flash
        attention, no mask tensor). A model whose forward requires the mask keeps it."""
        mask = batch.get("attention_mask")
        if self.label_token_ids is None and self.mask_optional and mask is not None \
                and mask.dim() == 2 and bool(mask.all()):  # a 4-D mask (DP's vmap) is kept
            return {k: v for k, v in batch.items() if k != "attention_mask"}
        return batch

    def objective(self) -> Objective:
        """The objective, chunked / label-rows-only where the head bypass applies."""
        return make_objective(self.label_token_ids, self.bypass)

    def wrap(self, forward: LossFn) -> LossFn:
        """`forward` compiled and/or under activation offload, as configured."""
        if self.config.compile and not self.config.compiles_blocks():
            forward = torch.compile(forward)
        offload = self.offload
        if offload is None:
            return forward

        def offloaded(batch: Batch) -> torch.Tensor:
            with offload.saving():
                return forward(batch)

        return offloaded

    @contextlib.contextmanager
    def installed(self, first: Batch | None, dense_forward: LossFn) -> Iterator[None]:
        """Checkpointing and the head bypass (checked on `first` against the dense loss)."""
        cfg = self.config
        with contextlib.ExitStack() as stack:
            if cfg.compile and (cfg.activation_budget is not None
                                or cfg.activation_quantization != "none"):
                # both are read when a graph is partitioned, and torch's compile cache does not
                # key on them: graphs of an earlier run must not serve this one, nor ours a later
                torch._dynamo.reset()
                stack.callback(torch._dynamo.reset)
            if self.bypass is not None and first is not None \
                    and not self.bypass.verify(first, dense_forward):
                self.bypass = None
            stack.enter_context(activation_checkpointing(
                self.model, cfg.checkpoint_every(), cfg.recompute_mode()))
            if cfg.compiles_blocks():
                stack.enter_context(compiled_blocks(self.model))
            if self.offload is not None:  # around the compiled blocks' calls
                stack.enter_context(self.offload.installed())
            if cfg.activation_budget is not None:  # read when a graph compiles: the first step
                stack.enter_context(memory_budget(cfg.activation_budget))
            stack.enter_context(quantized_activations(  # read when a graph compiles, too
                cfg.activation_quantization, cfg.activation_quantization_min_mb))
            if cfg.compile and SHARED_INPUT_LOWRANK:  # read when a graph compiles
                stack.enter_context(shared_input_lowrank())
            if self.bypass is not None:
                stack.enter_context(self.bypass.installed())
            dtype = torch.bfloat16 if uses_bf16(cfg.precision, self.device) else torch.float32
            stack.enter_context(self.kernels.installed(self.model, self.bypass, dtype))
            yield
