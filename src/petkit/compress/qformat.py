"""Integer-quantised models in the compressed-tensors layout, which transformers loads on the CPU.

After `block_ap` (or RTN) every quantised linear layer is described the way compressed-tensors
describes a frozen, asymmetric, group-wise int-b layer: `weight` = s ⊙ (Q - z) exactly, plus
`weight_scale` (out, groups) and `weight_zero_point` (out, groups, int8, offset by 2^(b-1)) and a
`quantization_scheme`. compressed-tensors needs the group to divide every layer: a group that
does not (128 on 576 inputs) is stored at the greatest common divisor, values repeated. `save_quantized` writes the folder through compressed-tensors' own
compressor (`ModelCompressor`) and `from_pretrained` reads it back to the same logits (tested).

Format, as measured with transformers 5.25 and compressed-tensors 0.20.1 on the CPU: the
"naive-quantized" format (codes stored one per int8) loads; the bit-packed "pack-quantized"
format does not load asymmetric groups (transformers allocates the zero points unpacked,
(out, groups), while the file holds them packed along rows: "size mismatch" on every layer).
So the folder stores one byte per weight, not b/8; the integers, scales and zero points are the
same, and a loader that fixes the packed zero points reads the packed format from the same
scheme. GPTQ layout: `gptqmodel` needs a compiled CUDA/CPU extension build that does not
complete on this machine (docs/compressed.md).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.models.loading import decompress_loaded
from petkit.models.packages import require_module

PIP = "compressed-tensors==0.20.1"


def _require() -> None:
    require_module("compressed_tensors", PIP, "saving an integer-quantised model (petkit[qat])")


def storage_group(model: nn.Module, paths: list[str], group: int) -> int:
    """The group size the folder stores: `group`, or where it does not divide every layer's inputs
    (compressed-tensors requires that), their greatest common divisor (128 on 576 -> 64)."""
    return math.gcd(group, *(model.get_submodule(p).weight.shape[1] for p in paths))


def _spread(values: torch.Tensor, group: int, stored: int) -> torch.Tensor:
    """Per-group values (out, groups of `group`) repeated onto the finer groups of `stored` inputs."""
    columns = values.shape[1] * group
    return values[:, torch.arange(0, columns, stored) // group]


def attach_scheme(model: nn.Module, grids: dict[str, tuple], bits: int, group: int) -> None:
    """Describe the quantised layers `grids` ({path: (codes, zeros, scales)}) as compressed-tensors does.

    A group that does not divide a layer is stored at `storage_group`: each of its (shared) scale
    and zero point repeated over the finer groups it covers, the same weights exactly.
    """
    _require()
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)

    stored = storage_group(model, list(grids), group)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                            group_size=stored)
    scheme = QuantizationScheme(targets=sorted(grids), weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme},
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    offset = 1 << (bits - 1)
    with torch.no_grad():
        for path, (_codes, zeros, scales) in grids.items():
            layer = model.get_submodule(path)
            scales, zeros = (_spread(t, group, stored)[:, :layer.weight_scale.shape[1]] for t in (scales, zeros))
            layer.weight_scale.copy_(scales.to(layer.weight_scale.dtype))
            layer.weight_zero_point.copy_((zeros.round() - offset).to(layer.weight_zero_point.dtype))
    for param in (p for n, p in model.named_parameters() if n.endswith(("weight_scale", "weight_zero_point"))):
        param.requires_grad_(False)
    model.__dict__["_petkit_int_quantization"] = {"bits": bits, "group_size": group,
                                                  "stored_group_size": stored, "layers": len(grids)}


def save_quantized(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write the quantised model as a compressed-tensors folder that `from_pretrained` loads."""
    _require()
    from compressed_tensors.compressors import ModelCompressor

    if "_petkit_int_quantization" not in model.__dict__:
        raise ConfigError("this model has no integer quantisation to save (quantize it with "
                          "method='efficientqat' or 'rtn' first)")
    folder = Path(folder)
    copy_ = copy.deepcopy(model)  # compressing packs the weights in place; keep the caller's model
    compressor = ModelCompressor.from_pretrained_model(copy_, quantization_format="naive-quantized")
    compressor.compress_model(copy_)
    copy_.save_pretrained(folder)
    compressor.update_config(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_quantized(folder: str | Path) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(folder)`, what any transformers user runs, with its
    layers decompressed at once (transformers waits for the first forward: `decompress_loaded`)."""
    _require()
    from transformers import AutoModelForCausalLM

    return decompress_loaded(AutoModelForCausalLM.from_pretrained(folder)).eval()


def text_windows(tokenizer: Any, texts: list[str], length: int, count: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` tokens from the texts joined by EOS, chosen with `seed`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    windows = torch.tensor(stream[: len(stream) // length * length]).reshape(-1, length)
    if len(windows) < count:
        raise ConfigError(f"the text holds {len(windows)} windows of {length} tokens, fewer than "
                          f"the {count} asked for (lower --samples or --seq-len)")
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:count]
    return windows[pick.sort().values]


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token loss over every window (each token predicted from its window)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total, tokens = total + loss.item(), tokens + ids[:, 1:].numel()
    model.train(was_training)
    return float(torch.exp(torch.tensor(total / tokens)))
