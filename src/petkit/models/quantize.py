"""Quantised bases: `pk.quantize(model, "nf4" | "fp4" | "int8")` through bitsandbytes or torchao.

    model = pk.quantize(model, "nf4")              # linear layers stored in 4 bits, in place
    pk.attach(model, pk.LoraConfig(r=16))          # QLoRA: the LoRA wrapper calls the 4-bit layer
    report = pk.merge_quantized(model, inputs)     # dequantise + add + requantise, error reported
    dense = pk.merge_dense(model)                  # or: a plain bf16 model to save_pretrained

Backends (both maintained, both optional: `pip install petkit[quant]`):
    bitsandbytes  nf4 / fp4 (`Linear4bit`, double-quantisation off) and int8 (`Linear8bitLt`,
                  threshold 0: pure row-wise int8). Its CPU backend dequantises then multiplies.
    torchao       nf4 (`NF4Tensor`, the weight of a plain nn.Linear) and int8 (`Int8Tensor`);
                  it has no CPU fp4.
Layers keep being `nn.Linear` (bitsandbytes subclasses it; torchao swaps only the weight), so
`core.targets` finds them and every wrapper calls them unchanged. Nothing is upcast: the stored
weight stays packed, the layer dequantises per call into a temporary in `compute_dtype`, and
deltas live in that compute dtype (`core.qweight.delta_dtype`). GPT-2 `Conv1D` layers are left
dense (neither backend has them). The spec is recorded on the model (`quantization_info`) and
in every adapter's fingerprint.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from petkit.core.delta import DeltaModule, canonical_modules, get_canonical, set_canonical
from petkit.core.errors import ConfigError, MissingPackageError
from petkit.core.qweight import QUANT_ATTR, dense_weight, is_quantized_weight
from petkit.core.targets import Targets, match_targets
from petkit.models.loading import quiet_optional_imports
from petkit.models.packages import extra_install

MODES = ("nf4", "fp4", "int8")
BACKENDS = ("auto", "bitsandbytes", "torchao")
_PIP = {"bitsandbytes": "pip install bitsandbytes", "torchao": "pip install torchao"}


@dataclass(frozen=True)
class QuantSpec:
    """How a base was quantised: enough to requantise a merged layer the same way."""

    mode: str = "nf4"
    backend: str = "bitsandbytes"
    block_size: int = 64
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"quantize mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.backend not in BACKENDS[1:]:
            raise ConfigError(f"quantize backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "torchao" and self.mode == "fp4":
            raise ConfigError("quantize mode 'fp4' needs backend 'bitsandbytes' (torchao has no CPU fp4)")
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"quantize block_size must be a power of two in 32..4096, got {self.block_size}")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)


def _require(backend: str) -> None:
    from importlib.util import find_spec

    if find_spec(backend) is None:
        raise MissingPackageError(f"quantize backend {backend!r} is not installed. Fix: {_PIP[backend]}")


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"quantize backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        _require(backend)
        return backend
    from importlib.util import find_spec

    for name in ("bitsandbytes", "torchao"):
        if find_spec(name) is not None:
            return name
    raise MissingPackageError(f"pk.quantize needs bitsandbytes or torchao. Fix: {extra_install('quant')}")


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> nn.Module:
    """A quantised linear layer holding `weight` (out, in) and `bias`, built by the spec's backend."""
    weight = weight.detach()
    if spec.backend == "bitsandbytes":
        return _bnb_linear(weight, bias, spec)
    return _torchao_linear(weight, bias, spec)


def _bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> nn.Module:
    with quiet_optional_imports():  # its CPU backend logs a missing optional kernel on import
        import bitsandbytes as bnb

    out_f, in_f = weight.shape
    device = weight.device
    if spec.mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to(spec.dtype).contiguous(), requires_grad=False,
                                         has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=spec.dtype,
                                  quant_type=spec.mode, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(spec.dtype).contiguous(), requires_grad=False,
                                         quant_type=spec.mode, blocksize=spec.block_size).to(device)
        # bitsandbytes' CPU inference repacking (eval + no grad) swaps the weight for a layout whose
        # matmul has no autograd: a later training step would silently drop the gradient through
        # the base. Keep the one layout that trains.
        layer.support_avx512bf16_for_cpu = False
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(spec.dtype).clone(), requires_grad=False)
    return layer


def _torchao_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> nn.Module:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=spec.dtype)
    w = weight.to(spec.dtype).contiguous()
    if spec.mode == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        blocks = w.numel() // spec.block_size
        layer.weight = nn.Parameter(to_nf4(w, spec.block_size, math.gcd(blocks, 256)), requires_grad=False)
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        layer.weight = nn.Parameter(w, requires_grad=False)
        quantize_(layer, Int8WeightOnlyConfig())
        layer.weight.requires_grad_(False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(spec.dtype).clone(), requires_grad=False)
    return layer


def _fits(layer: nn.Module, spec: QuantSpec) -> bool:
    """Whether the backend can store this layer (torchao nf4 needs whole blocks)."""
    if type(layer) is not nn.Linear and not isinstance(layer, nn.Linear):
        return False
    return not (spec.backend == "torchao" and spec.mode == "nf4" and layer.weight.numel() % spec.block_size)


def quantize(
    model: nn.Module,
    mode: str = "nf4",
    *,
    targets: Targets = "all-linear",
    backend: str = "auto",
    block_size: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantise the model's linear layers in place (the output head stays dense); returns the model.

    Call it before attaching adapters. `compute_dtype` (default: the layers' own dtype) is what each
    layer dequantises into per call, and what deltas attached later are created in.
    """
    if any(isinstance(m, DeltaModule) for m in model.modules()):
        raise ConfigError("quantize the base before attaching adapters (pk.unload first)")
    if quantization_info(model) is not None:
        raise ConfigError(f"this model is already quantised ({quantization_info(model)['mode']})")
    paths = match_targets(model, targets)
    modules = {p: inner for p, _, inner in canonical_modules(model)}
    first = modules[paths[0]].weight
    dtype = compute_dtype or first.dtype
    spec = QuantSpec(mode, _resolve_backend(backend), block_size, str(dtype).removeprefix("torch."))
    done, skipped = quantize_paths(model, paths, spec)
    model.__dict__[QUANT_ATTR] = {**asdict(spec), "layers": len(done), "skipped": skipped}
    _release_checkpoint(model)
    return model


def quantize_paths(model: nn.Module, paths: list[str], spec: QuantSpec) -> tuple[list[str], list[str]]:
    """Replace the (innermost) linear layer at each path by its quantised form: (done, skipped:
    layers the spec cannot store or already quantised)."""
    modules = {p: inner for p, _, inner in canonical_modules(model)}
    done, skipped = [], []
    for path in paths:
        layer = modules[path]
        if not _fits(layer, spec) or is_quantized_weight(layer.weight):
            skipped.append(path)
            continue
        replace_innermost(model, path, quantize_linear(layer.weight, layer.bias, spec))
        done.append(path)
    return done, skipped


def _release_checkpoint(model: nn.Module) -> None:
    """Copy the weights left dense (embeddings, norms, head) into memory of their own.

    transformers maps the safetensors checkpoint into memory; the dense tensors left after
    quantising still point into that mapping, which keeps every page of it resident, the
    full-precision weights of the quantised layers included (measured on smollm2-135m: 520 MB
    file-backed RSS stays mapped after `quantize` without this, 115 MB with it). Copying the
    few dense tensors lets the mapping close.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and not is_quantized_weight(tensor):
                tensor.data = tensor.data.clone()


def quantization_info(model: nn.Module) -> dict | None:
    """The spec `quantize` recorded on the model (mode, backend, block size, ...), or None."""
    return model.__dict__.get(QUANT_ATTR)


def spec_of(model: nn.Module) -> QuantSpec:
    info = quantization_info(model)
    if info is None:
        raise ConfigError("this model is not quantised (pk.quantize it first)")
    return QuantSpec(info["mode"], info["backend"], info["block_size"], info["compute_dtype"])


def quantized_paths(model: nn.Module) -> list[str]:
    """Canonical paths of the quantised linear layers."""
    return [p for p, _, inner in canonical_modules(model)
            if isinstance(inner, nn.Linear) and is_quantized_weight(inner.weight)]


def dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every quantised linear layer by a dense nn.Linear in `dtype` (in place)."""
    for path in quantized_paths(model):
        inner = dict((p, i) for p, _, i in canonical_modules(model))[path]
        dense = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None,
                          device="meta", dtype=dtype)
        dense.weight = nn.Parameter(dense_weight(inner, dtype).clone(), requires_grad=False)
        if inner.bias is not None:
            dense.bias = nn.Parameter(inner.bias.detach().to(dtype).clone(), requires_grad=False)
        replace_innermost(model, path, dense)
    model.__dict__.pop(QUANT_ATTR, None)
    return model


def replace_innermost(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the original module at `path` sits, under any wrappers stacked on it."""
    outer = get_canonical(model, path)
    if not isinstance(outer, DeltaModule):
        set_canonical(model, path, new)
        return
    while isinstance(outer.base, DeltaModule):
        outer = outer.base
    outer.base = new
