"""Compressing the base while tuning: quantised bases, and structured pruning driven by LoRA gradients.

Quantisation (QLoRA-style nf4/fp4, int8) lives in `petkit.models.quantize` and
`petkit.models.quant_merge` and is re-exported here; PEQA is a method (`petkit.methods.peqa`);
EfficientQAT's Block-AP (int4/3/2) is `petkit.compress.efficientqat`, saved by `qformat`.
Pruning (LoRAPrune, APT) is this regime's own: it hooks the standard training loop through gates
that declare the StepHooked capability, then slices the model physically.
"""
from typing import Any

from torch import nn

from petkit.compress.efficientqat import INT_MODES, quantize_int
from petkit.compress.qformat import load_quantized, perplexity, save_quantized
from petkit.compress.prune import PruneConfig, Pruner, finish_pruning, start_pruning
from petkit.models.quant_merge import MergeReport, merge_dense, merge_quantized
from petkit.models.quantize import dequantize, quantization_info
from petkit.models.quantize import quantize as _quantize_float


def quantize(model: nn.Module, mode: str = "nf4", *, method: str | None = None, **options: Any) -> nn.Module:
    """`pk.quantize(model, "nf4")` (bitsandbytes / torchao), or integer int4/int3/int2 with
    `method="efficientqat"` (Block-AP, `calibration=` token ids) or `method="rtn"`
    (`petkit.compress.efficientqat.quantize_int`, saved by `save_quantized`)."""
    if method is None and mode not in INT_MODES:
        return _quantize_float(model, mode, **options)
    return quantize_int(model, mode, method=method or "rtn", **options)


__all__ = ["MergeReport", "PruneConfig", "Pruner", "dequantize", "finish_pruning", "merge_dense",
           "merge_quantized", "quantization_info", "quantize", "quantize_int", "load_quantized", "perplexity",
           "save_quantized", "start_pruning"]
