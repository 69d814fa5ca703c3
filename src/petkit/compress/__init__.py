"""Compressing the base while tuning: quantised bases, and structured pruning driven by LoRA gradients.

Quantisation (QLoRA-style nf4/fp4, int8) lives in `petkit.models.quantize` and
`petkit.models.quant_merge` and is re-exported here; PEQA is a method (`petkit.methods.peqa`).
Pruning (LoRAPrune, APT) is this regime's own: it hooks the standard training loop through gates
that declare the StepHooked capability, then slices the model physically.
"""
from petkit.compress.prune import PruneConfig, Pruner, finish_pruning, start_pruning
from petkit.models.quant_merge import MergeReport, merge_dense, merge_quantized
from petkit.models.quantize import dequantize, quantization_info, quantize

__all__ = ["MergeReport", "PruneConfig", "Pruner", "dequantize", "finish_pruning", "merge_dense",
           "merge_quantized", "quantization_info", "quantize", "start_pruning"]
