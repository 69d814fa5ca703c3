"""Merging adapters into a quantised base, with the error it adds measured — or into a dense copy.

A 4-bit weight cannot take `W += dW` in place. Two ways out:

    report = merge_quantized(model, inputs)   W' = Q(deq(W) + dW): still 4/8-bit, same spec;
                                              report = relative logits error of the merged model
                                              against the unmerged one on `inputs`
    dense  = merge_dense(model, torch.bfloat16)   W' = deq(W) + dW in bf16: a plain model
                                              (`save_pretrained` gives an ordinary HF folder)
    model, note = merge_for_saving(model, requantize=True, inputs=batch)   (bitsandbytes)
                                              the requantised model with the BitsAndBytesConfig
                                              that makes `from_pretrained` reload it as it is

Requantising moves every weight of a block to the new grid, so a merge into 4 bits is lossy
(PEFT's is too, with nothing reported); `merge_quantized` says by how much. Both remove every
petkit wrapper: what is left is a plain (quantised or dense) model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petkit.core.capabilities import MergesOwnDeltas
from petkit.core.delta import canonical_modules, iter_deltas
from petkit.core.errors import AdapterStateError, ConfigError
from petkit.core.model import merge_deltas, unload
from petkit.core.qweight import dense_weight, is_quantized_weight
from petkit.core.state import active_adapters
from petkit.models.quantize import dequantize, quantize_linear, quantized_paths, replace_innermost, spec_of


@dataclass(frozen=True)
class MergeReport:
    """What `merge_quantized` did: layers requantised and the relative logits error it added."""

    layers: int
    relative_error: float | None  # ||merged - unmerged|| / ||unmerged|| on the inputs given; None without inputs


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def _active_deltas(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Summed weight/bias deltas of the active adapters per canonical path; raises if one cannot merge."""
    active = set(active_adapters(model))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, w in iter_deltas(model):
        if w.adapter_name not in active or w.merged:
            continue
        if not (w.mergeable or isinstance(w, MergesOwnDeltas)):
            raise AdapterStateError(f"adapter {w.adapter_name!r} ({type(w).__name__}) is not mergeable")
        for name, d in merge_deltas(w).items():
            if d is None:
                continue
            if not torch.isfinite(d).all():
                raise AdapterStateError(f"adapter {w.adapter_name!r} holds NaN/inf at {path}; nothing was merged")
            slot = out.setdefault(path, {})
            slot[name] = slot[name] + d.float() if name in slot else d.float()
    return out


def _merged_layer(inner: nn.Module, delta: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = dense_weight(inner, torch.float32) + delta.get("weight", 0)
    bias = inner.bias.detach().float() if getattr(inner, "bias", None) is not None else None
    if "bias" in delta:
        bias = delta["bias"] if bias is None else bias + delta["bias"]
    return weight, bias


def merge_quantized(model: nn.Module, inputs: dict[str, Any] | None = None) -> MergeReport:
    """Fold the active adapters into the quantised base (dequantise, add, requantise); unload the rest.

    With `inputs` (a batch for `model(**inputs)`), reports the relative logits error the merge added.
    """
    spec = spec_of(model)
    deltas = _active_deltas(model)
    reference = _logits(model, inputs) if inputs is not None else None
    inners = {p: inner for p, _, inner in canonical_modules(model)}
    new_layers = {}
    for path, delta in deltas.items():
        inner = inners[path]
        weight, bias = _merged_layer(inner, delta)
        if isinstance(inner, nn.Linear) and is_quantized_weight(inner.weight):
            new_layers[path] = quantize_linear(weight, bias, spec)
        else:  # a dense layer (e.g. left unquantised): a plain add
            new_layers[path] = _dense_like(inner, weight, bias)
    unload(model, merge=False)
    for path, layer in new_layers.items():
        replace_innermost(model, path, layer)
    error = relative_error(_logits(model, inputs), reference) if reference is not None else None
    return MergeReport(len(new_layers), error)


def _dense_like(inner: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    dtype = next(p.dtype for p in inner.parameters() if p.is_floating_point())
    with torch.no_grad():
        inner.weight.copy_(weight.to(dtype))
        if bias is not None:
            if inner.bias is None:
                inner.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
            else:
                inner.bias.copy_(bias.to(dtype))
    return inner


def merge_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Dequantise the base to `dtype`, fold the active adapters in, remove every wrapper: a plain model."""
    deltas = _active_deltas(model)
    dequantize(model, dtype)
    inners = {p: inner for p, _, inner in canonical_modules(model)}
    for path, delta in deltas.items():
        weight, bias = _merged_layer(inners[path], delta)
        _dense_like(inners[path], weight, bias)
    unload(model, merge=False)
    return model


def hf_quantization_config(model: nn.Module) -> Any:
    """The transformers `BitsAndBytesConfig` that reloads this bitsandbytes-quantised model as it is.

    Set as `model.config.quantization_config` before `save_pretrained`: `from_pretrained` then reads
    the packed weights back bit for bit (tested); the layers left dense are named as skipped.
    """
    from transformers import BitsAndBytesConfig

    spec = spec_of(model)
    if spec.backend != "bitsandbytes":
        raise ConfigError(f"saving a quantised model as a Hugging Face folder needs the bitsandbytes "
                          f"backend (this one is {spec.backend}); merge into a dense copy instead")
    quantized = set(quantized_paths(model))
    skipped = [p for p, _, inner in canonical_modules(model) if isinstance(inner, nn.Linear) and p not in quantized]
    if spec.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skipped)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.mode, bnb_4bit_compute_dtype=spec.dtype,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skipped)


def merge_for_saving(model: nn.Module, requantize: bool = False,
                     inputs: dict[str, Any] | None = None) -> tuple[nn.Module, str]:
    """A quantised model with adapters -> a plain model to `save_pretrained`, and a line saying what it is.

    Default: dequantised to the compute dtype with the deltas added (exact). `requantize`: merged
    into the 4/8-bit weights (`merge_quantized`, its added error measured on `inputs`) with the
    `BitsAndBytesConfig` that reloads it attached to `model.config`.
    """
    spec = spec_of(model)
    if not requantize:
        merge_dense(model, spec.dtype)
        return model, f"merged into the dequantised {spec.mode} base, saved in {spec.compute_dtype} (exact)"
    config = hf_quantization_config(model)
    report = merge_quantized(model, inputs)
    model.config.quantization_config = config
    error = "" if report.relative_error is None else \
        f"; relative logits error added by requantising: {report.relative_error:.4f}"
    return model, f"merged into the {spec.mode} weights of {report.layers} layers (dequantise, add, requantise){error}"
