"""LoftQ — Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
Models" (arXiv:2310.08659): quantise the base and start LoRA at what quantisation lost.

    pk.attach(model, pk.LoraConfig(r=16, init="loftq", targets="all-linear"))
    pk.loftq(model, "nf4", iters=1)       # the LoRA layers' bases become 4-bit; A, B set

For each LoRA layer with weight W (alternating `iters` times, from B A = 0):
    Q = quant(W - s B A)                  # the quantiser of `pk.quantize` (models/quantize.py)
    s B A = top-r SVD of W - deq(Q)       # B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_r^T
so at the start deq(Q) + s B A is closer to W than deq(Q) alone (identity up to the rank-r
remainder of the quantisation error). Unlike PEFT (whose LoftQ factors ignore the scaling
alpha/r), s B A is the SVD part for any alpha. The model records the quantisation like
`pk.quantize` and the adapter's base fingerprint is taken again: save the quantised base with
the adapter (`pk.merge_quantized` / its state dict) — the adapter belongs to that base.
Cost at attach: per layer `iters` quantisations and full SVDs of an (out, in) matrix.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from petkit.core.capabilities import LowRank
from petkit.core.errors import ConfigError
from petkit.core.fingerprint import fingerprint
from petkit.core.qweight import QUANT_ATTR, dense_weight
from petkit.core.state import adapters, check_known, wrappers_of
from petkit.core.delta import innermost
from petkit.core.targets import linear_dims
from petkit.methods.family.lora_init import weight_factors
from petkit.core.targets import match_targets
from petkit.models.quantize import QuantSpec, _fits, _resolve_backend, quantization_info, quantize_linear, \
    quantize_paths, replace_innermost


def loftq_layer(weight: torch.Tensor, bias: torch.Tensor | None, r: int, scale: float, spec: QuantSpec,
                iters: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(quantised layer, A, B) for one dense (out, in) weight."""
    w = weight.detach().float()
    a = b = None
    target = w
    for _ in range(iters):
        layer = quantize_linear(target.to(weight.dtype), bias, spec)
        a, b = weight_factors("pissa", w - dense_weight(layer, torch.float32), r, scale)  # top-r SVD part
        target = w - scale * b @ a
    return layer, a, b


def loftq(model: nn.Module, mode: str = "nf4", *, name: str = "default", iters: int = 1,
          backend: str = "auto", block_size: int = 64, all_linear: bool = False) -> nn.Module:
    """Quantise the bases of adapter `name`'s LoRA layers (attached with init="loftq") LoftQ's way.

    `all_linear`: also quantise every other linear layer as `pk.quantize` does, so that with one
    iteration the base is exactly `pk.quantize(model, mode)`'s (what `petkit train` records)."""
    check_known(model, [name])
    record = adapters(model)[name]
    if record.config.method != "lora" or record.config.to_dict().get("init") != "loftq":
        raise ConfigError(f"adapter {name!r} is not a LoRA attached with --method.init loftq")
    if quantization_info(model) is not None:
        raise ConfigError("LoftQ needs the full-precision base: attach and run pk.loftq before any pk.quantize")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq iters must be an int >= 1, got {iters!r}")
    layers = [(p, w) for p, w in wrappers_of(model, [name]) if isinstance(w, LowRank)]
    dtype = innermost(layers[0][1]).weight.dtype
    spec = QuantSpec(mode, _resolve_backend(backend), block_size, str(dtype).removeprefix("torch."))
    for path, w in layers:
        inner = innermost(w)
        if not _fits(inner, spec) or linear_dims(inner)[2]:
            raise ConfigError(f"{path}: LoftQ quantises nn.Linear layers ({spec.backend} {mode} cannot store it)")
    for path, w in layers:
        inner = innermost(w)
        lora_a, lora_b, scale = w.lowrank()
        layer, a, b = loftq_layer(inner.weight, inner.bias, lora_a.shape[0], scale, spec, iters)
        replace_innermost(model, path, layer)
        with torch.no_grad():
            lora_a.copy_(a)
            lora_b.copy_(b)
        w.init_needs = None
    done, skipped = [p for p, _ in layers], []
    if all_linear:
        more, skipped = quantize_paths(model, [p for p in match_targets(model, "all-linear") if p not in done], spec)
        done += more
    model.__dict__[QUANT_ATTR] = {**asdict(spec), "layers": len(done), "skipped": skipped}
    record.fingerprint = fingerprint(model, record.targets)
    return model
