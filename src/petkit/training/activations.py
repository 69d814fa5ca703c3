"""Activation memory: checkpointing (recompute) and offload of a model's saved activations.

`activation_checkpointing` wraps the forward of the model's transformer blocks (`core.blocks`) in
non-reentrant `torch.utils.checkpoint` for the run and restores them afterwards:

- "full": every block keeps only its inputs; the rest is recomputed in the backward pass.
- "every-K": every K-th block (0, K, 2K, ...) is checkpointed; the others keep their activations.
- "selective": every block, but the outputs that are costly to recompute and cheap to keep are
  saved: attention, and every matmul that reduces a dimension at least twofold (the MLP's down
  projection, grouped-query key/value projections, LoRA's A); the rest is recomputed.
- "elementwise": every block, saving attention and every matmul's output: only the element-wise
  ops (norms, activations, rotary embeddings, residual sums, casts) are recomputed. Near the
  speed of no checkpointing, at a memory between "selective" and "off".

Non-reentrant checkpointing needs no input that requires grad and composes with DDP and
torch.compile (hub kernels' wrappers are switched off inside the checkpointed blocks: see
`hub_kernels`). Input-extension methods keep working: the prefix key/value cache and the
extensions' per-forward state (`live`) are put back as they were when the block first ran
before it is recomputed. `activation_offload` keeps the blocks' saved activations in host memory
instead (`activation_offload.py`). Under compile,
`activation_budget` lets the compiler choose what to recompute instead (`memory_budget`), and
`activation_quantization` has it keep what it saves in 8-bit floats (`quantized_activations`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

import petkit.core.accumulate  # noqa: F401 - registers torch.ops.petkit.addmm_into
from petkit.core.blocks import layer_paths
from petkit.core.capabilities import HoldsForwardState
from petkit.core.delta import iter_deltas
from petkit.core.errors import ConfigError
from petkit.training.hub_kernels import plain_forwards

_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
# op: (i, j) with args[i] @ args[j] its product; petkit::addmm_into (core.accumulate) is the
# in-place addmm of compiled LoRA layers: h (N, r) @ B^T, B given as (out, r)
_MATMUL = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
           torch.ops.petkit.addmm_into.default: (1, 2)}


RECOMPUTE_MODES = ("full", "selective", "elementwise")
QUANTIZED_ACTIVATIONS = ("none", "fp8", "fp8-mlp")


def save_like_matmul(op: Any, operands: tuple[int, int]) -> None:
    """Let the "selective" and "elementwise" policies treat custom op `op` as the matmul
    args[i] @ args[j] for `operands` (i, j): a kernel that replaces one (`triton_delta`)."""
    _MATMUL[op] = operands


def _keep_reducing_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The "selective" policy: save attention and reducing matmuls' outputs, recompute the rest."""
    if op in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMUL:
        a, b = (args[i] for i in _MATMUL[op])
        if a.shape[-1] >= 2 * b.shape[-1]:  # (M, K) @ (K, N) with K >= 2 N
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_all_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The "elementwise" policy: save attention and every matmul's output, recompute the rest."""
    if op in _ATTENTION or op in _MATMUL:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_POLICIES = {"selective": _keep_reducing_matmuls, "elementwise": _keep_all_matmuls}


def _state_objects(values: Iterator[Any]) -> list[Any]:
    """Objects whose attributes a block's forward mutates: a key/value cache and its layers."""
    found = []
    for value in values:
        if value is None or isinstance(value, (torch.Tensor, int, float, bool, str)):
            continue
        if hasattr(value, "update") and (hasattr(value, "layers") or hasattr(value, "key_cache")):
            found.append(value)
            found.extend(getattr(value, "layers", []) or [])
    return found


def _snapshot(objects: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """Shallow copies of `objects`' attributes (lists copied too): tensors are never mutated in
    place by a cache update, only replaced, so references are enough."""
    return [(o, {k: list(v) if isinstance(v, list) else v for k, v in vars(o).items()})
            for o in objects]


def _restore(snapshot: list[tuple[Any, dict[str, Any]]]) -> None:
    for obj, attrs in snapshot:
        vars(obj).update({k: list(v) if isinstance(v, list) else v for k, v in attrs.items()})


def _extensions(model: nn.Module) -> list[Any]:
    """Wrappers that hold per-forward state (`live`): input extensions."""
    return [w for _, w in iter_deltas(model) if isinstance(w, HoldsForwardState)]


def has_extensions(model: nn.Module) -> bool:
    """Whether a method adds virtual tokens or key/value prefixes to the model's input."""
    return bool(_extensions(model))


def _checkpointed(forward: Callable[..., Any], extensions: list[Any], extra: dict[str, Any],
                  *args: Any, **kwargs: Any) -> Any:
    """`forward(*args, **kwargs)` under non-reentrant checkpointing (`extra`: its selective
    policy, if any), with the mutable state it reads (cache, extensions' `live`) restored to its
    first-run values for the recompute."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    objects = _state_objects(iter(list(args) + list(kwargs.values())))
    if not objects and all(ext.live is None for ext in extensions):  # nothing to put back
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
    state = _snapshot(objects)
    lives = [(ext, ext.live) for ext in extensions]
    first = [True]

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        if first[0]:
            first[0] = False
            return forward(*inner_args, **inner_kwargs)
        after = _snapshot([o for o, _ in state])
        now = [(ext, ext.live) for ext in extensions]
        _restore(state)
        for ext, live in lives:
            ext.live = live
        try:
            return forward(*inner_args, **inner_kwargs)
        finally:
            _restore(after)
            for ext, live in now:
                ext.live = live

    return checkpoint(run, *args, use_reentrant=False, **extra, **kwargs)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (`core.blocks`); `ConfigError` when it has no such stack
    (activation checkpointing and block compilation work block by block)."""
    paths = layer_paths(model)
    if not paths:
        raise ConfigError("RuntimeConfig.activation_checkpointing and compile_scope='blocks' need "
                          "a model with a stack of transformer blocks; this model has none")
    return [model.get_submodule(p) for p in paths]


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, every: int, mode: str = "full"
                             ) -> Iterator[int]:
    """Checkpoint every `every`-th block of `model` inside the context (0: nothing), recomputing
    what `mode` (one of RECOMPUTE_MODES) says; yields the number of blocks wrapped.
    `ConfigError` when asked for on a model with no block stack."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"checkpointing mode must be one of {RECOMPUTE_MODES}, not {mode!r}")
    if every == 0:
        yield 0
        return
    blocks = block_modules(model)[::every]
    extensions = _extensions(model)
    policy = _POLICIES.get(mode)
    extra = ({"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}
             if policy is not None else {})
    own = [vars(block).get("forward") for block in blocks]  # an instance forward set by others
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward, extensions, extra)
    try:
        with plain_forwards(blocks):  # no hub-kernels global store to break a compiled graph
            yield len(blocks)
    finally:
        for block, previous in zip(blocks, own):
            if previous is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = previous


@contextlib.contextmanager
def compiled_blocks(model: nn.Module) -> Iterator[int]:
    """`torch.compile` each transformer block of `model` inside the context (regional
    compilation: identical blocks share one compiled graph instead of one graph of the whole
    model); yields the number of blocks. Checkpointing installed on a block
    (above) is traced into its graph, since the compiled call runs the block's `forward`."""
    blocks = block_modules(model)
    previous = [block._compiled_call_impl for block in blocks]
    for block in blocks:
        block.compile()
    try:
        yield len(blocks)
    finally:
        for block, before in zip(blocks, previous):
            block._compiled_call_impl = before


def memory_budget(fraction: float) -> contextlib.AbstractContextManager[Any]:
    """torch.compile's partitioner keeps at most `fraction` of the activations of the graphs
    compiled inside, recomputing the ops cheapest per byte saved (its knapsack solver)."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=fraction)


@contextlib.contextmanager
def quantized_activations(kind: str, min_mb: float) -> Iterator[None]:
    """Graphs compiled inside keep saved activations of at least `min_mb` MiB (bf16, fp16 or
    fp32) as fp8 e4m3 with one scale per tensor (amax / 448), quantized in the forward graph's
    epilogue and dequantized in the backward graph's prologue (inductor's
    `activation_quantization_aten_pass`): half of bf16's bytes, a relative rounding error of up to
    2^-4 in what the backward reads; the forward's values are unchanged. "fp8": every such
    activation; "fp8-mlp": only those as wide as the widest one a graph saves (a block's MLP
    hidden activations), leaving the residual stream's outlier channels, which one scale per
    tensor rounds coarsely, and attention's inputs in their own dtype (docs/training-gpu.md).
    Weights are never quantized (the pass skips static inputs)."""
    if kind == "none":
        yield
        return
    import torch._functorch.partitioners as partitioners
    import torch._inductor.config as inductor_config

    if not {"enable_activation_quantization", "should_quantize"} <= vars(partitioners).keys():
        raise ConfigError(f"--runtime.activation_quantization={kind} needs torch's activation "
                          f"quantization pass (torch >= 2.8); this is torch {torch.__version__}")
    options = dict(inductor_config.post_grad_fusion_options)
    options["activation_quantization_aten_pass"] = {
        "quant_type": "torch.float8_e4m3fn", "use_scaling": True, "size_in_mb": float(min_mb),
        "allowed_dtypes": "torch.bfloat16;torch.float16;torch.float32"}
    widest = _widest_only(partitioners) if kind == "fp8-mlp" else contextlib.nullcontext()
    with inductor_config.patch(post_grad_fusion_options=options), widest:
        yield


@contextlib.contextmanager
def _widest_only(partitioners: Any) -> Iterator[None]:
    """Within the context the quantization pass takes, of a graph's saved activations, only
    those whose last dimension is the largest among them."""
    enable, should = partitioners.enable_activation_quantization, partitioners.should_quantize

    def width(node: Any) -> int:
        if node.op == "placeholder":  # a graph input, e.g. a block's: the residual stream
            return 0
        value = node.meta.get("val")
        return value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else 0

    def enable_widest(saved_values: list[Any], *args: Any, **kwargs: Any) -> None:
        widest = max((width(n) for n in saved_values), default=0)
        partitioners.should_quantize = lambda node: should(node) and width(node) == widest
        try:
            enable(saved_values, *args, **kwargs)
        finally:
            partitioners.should_quantize = should

    partitioners.enable_activation_quantization = enable_widest
    try:
        yield
    finally:
        partitioners.enable_activation_quantization = enable
