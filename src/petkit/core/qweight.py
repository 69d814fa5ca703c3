"""Reading a linear layer's weight whatever its storage: plain, bitsandbytes 4/8-bit, torchao.

A quantised base (`pk.quantize`) keeps its layers' classes (bitsandbytes `Linear4bit` and
`Linear8bitLt` subclass `nn.Linear`; torchao swaps the weight for a tensor subclass), so wrappers
find and call them as before. What a wrapper may not do is read `weight` as a dense float
matrix: a 4-bit weight is a packed uint8 column. Two helpers answer the two questions wrappers
ask of their base:

    delta_dtype(module)   the dtype a delta next to it should use (the base's compute dtype)
    dense_weight(module)  the weight as a dense float (out, in) / Conv1D (in, out) tensor

`dense_weight` dequantises into a temporary: the stored weight is never replaced or upcast.
bitsandbytes is imported only when a bitsandbytes weight is met.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

QUANT_ATTR = "_petkit_quantization"  # where `pk.quantize` records its spec on the model


def quantization_record(model: nn.Module) -> dict | None:
    """The base's quantisation (mode, backend, block size, compute dtype) for fingerprints, or None."""
    info = model.__dict__.get(QUANT_ATTR)
    return None if info is None else {k: info[k] for k in ("mode", "backend", "block_size", "compute_dtype")}


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A weight's (out, in) shape even when stored packed (bitsandbytes 4-bit keeps it in quant_state)."""
    state = getattr(param, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(param.shape)


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """True for a bitsandbytes packed weight or a torchao quantised tensor subclass."""
    if type(weight) in (torch.Tensor, nn.Parameter):  # plain: no string test (torch.compile)
        return not weight.is_floating_point()
    return not weight.is_floating_point() or type(weight).__module__.startswith("torchao")


def delta_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a delta beside `module` computes in: its weight's, its compute dtype
    (bitsandbytes Linear4bit), else the first floating parameter under it; float32 if none."""
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        compute = getattr(sub, "compute_dtype", None)
        if isinstance(compute, torch.dtype):
            return compute
    floating = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float32


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The module's weight as a dense floating tensor in its stored layout (a dequantised copy if quantised)."""
    weight = module.weight
    dtype = dtype or delta_dtype(module)
    if not is_quantized_weight(weight):
        return weight if dtype == weight.dtype else weight.to(dtype)
    state = getattr(weight, "quant_state", None)
    if state is not None:  # bitsandbytes 4-bit (Params4bit)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).to(dtype)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(module.state, "SCB", None) if hasattr(module, "state") else None
    if scb is not None:  # bitsandbytes int8 (Int8Params): row-wise absmax scaling
        return (weight.data.float() * (scb.float()[:, None] / 127.0)).to(dtype)
    for name in ("get_original_weight", "dequantize"):  # torchao tensor subclasses (NF4Tensor, Int8Tensor)
        fn = getattr(weight, name, None)
        if callable(fn):
            return fn().to(dtype)
    raise TypeError(f"cannot read the weight of {type(module).__name__} ({type(weight).__name__}) as a dense tensor")


def quantization_field(model: nn.Module) -> dict:
    """{"quantization": record} for a quantised base's fingerprint; {} for a dense one."""
    record = quantization_record(model)
    return {"quantization": record} if record else {}


def quantization_changed(expected: dict, actual: dict) -> bool:
    """True, with a warning, when an adapter's base and this one differ in quantisation.

    Quantising changes every weight, so the weight hash cannot match; loading an adapter trained
    on a 4-bit base onto the full-precision one (or back) is allowed, and said.
    """
    before, now = expected.get("quantization"), actual.get("quantization")
    if before == now:
        return False
    import warnings

    def show(q: dict | None) -> str:
        return f"{q['mode']} ({q['backend']})" if q else "not quantised"

    warnings.warn(f"the adapter's base was {show(before)}; this base is {show(now)}: loading anyway "
                  "(the weight hash is not compared)", stacklevel=4)
    return True


def plain_tensor(param: torch.Tensor) -> torch.Tensor:
    """A plain float CPU tensor of what is stored (a torchao subclass is dequantised), for hashing."""
    t = param.detach()
    if type(t).__module__.startswith("torchao"):
        fn = getattr(t, "get_original_weight", None) or getattr(t, "dequantize")
        t = fn()
    return t.float().cpu().contiguous()


def integer_grid(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The integer grid of a layer quantised in the compressed-tensors layout, else None.

    Such a layer (EfficientQAT / RTN through `petkit.compress.qformat`, or any compressed-tensors
    int-b asymmetric group checkpoint read by `from_pretrained`) holds `weight` = s ⊙ (q - z) with
    `weight_scale` s and signed `weight_zero_point` z beside it. Returned in PEQA's unsigned form:
    (codes (out, groups, group) uint8, zero points (out, groups) uint8, scales (out, groups)).
    """
    scale = getattr(module, "weight_scale", None)
    zero = getattr(module, "weight_zero_point", None)
    args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if not isinstance(scale, torch.Tensor) or not isinstance(zero, torch.Tensor) or args is None:
        return None
    if scale.dim() != 2 or zero.shape != scale.shape:
        return None  # per-tensor or symmetric schemes: PEQA's own RTN applies
    if not module.weight.is_floating_point():
        raise ConfigError("this integer layer is still compressed (its weight holds int8 codes): load "
                          "the folder with petkit (`--model DIR`, pk.load_quantized) or run one forward first")
    offset, qmax = 1 << (args.num_bits - 1), (1 << args.num_bits) - 1
    scales = scale.detach().float()
    w = module.weight.detach().float().reshape(scales.shape[0], scales.shape[1], -1)
    zeros = zero.detach().float() + offset
    codes = torch.round(w / scales[..., None]) + zeros[..., None]
    return codes.clamp(0, qmax).to(torch.uint8), zeros.to(torch.uint8), scales
