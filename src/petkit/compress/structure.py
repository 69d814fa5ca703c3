"""The prunable structure of a Llama-style decoder, and the physical slicing that removes it.

Two kinds of structure per decoder layer:

    KV group   one key/value head and the n_rep query heads that read it (grouped-query
               attention): rows of q_proj (n_rep * head_dim), k_proj and v_proj (head_dim
               each), columns of o_proj (n_rep * head_dim)
    channel    one MLP hidden unit: a row of gate_proj and up_proj, a column of down_proj

Removing a group's o_proj columns (or a channel's down_proj column) already removes all its
effect, which is why training masks only those inputs (`gates.py`); the rows feeding them are
dead and go too when the model is sliced. Hugging Face's Llama config has one head count and
one intermediate size for all layers, so every layer keeps the same number of groups and
channels (each layer chooses which ones): pruning is uniform per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from petkit.core.delta import innermost
from petkit.core.errors import TargetError


@dataclass(frozen=True)
class LayerParts:
    """Canonical module paths and sizes of one decoder layer."""

    index: int
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str
    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    def attention(self) -> tuple[str, ...]:
        return self.q, self.k, self.v, self.o

    def mlp(self) -> tuple[str, ...]:
        return self.gate, self.up, self.down


def decoder_layers(model: nn.Module) -> list[LayerParts]:
    """Every decoder layer of a Llama-family model (q/k/v/o and gate/up/down projections)."""
    config = getattr(model, "config", None)
    layers = _layer_list(model)
    if config is None or layers is None:
        raise TargetError(f"pruning needs a Llama-style decoder (model.layers of attention + gated MLP); "
                          f"got {type(innermost(model)).__name__}")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prefix, modules = layers
    out = []
    for i, layer in enumerate(modules):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(innermost(mlp), "gate_proj"):
            raise TargetError(f"layer {i} has no self_attn / gated mlp: not a Llama-style decoder")
        p = f"{prefix}.{i}"
        out.append(LayerParts(i, f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj",
                              f"{p}.self_attn.o_proj", f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj",
                              f"{p}.mlp.down_proj", heads, kv, head_dim, config.intermediate_size))
    return out


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    for prefix in ("model.layers", "layers", "model.model.layers"):
        module: nn.Module | None = model
        for part in prefix.split("."):
            module = getattr(innermost(module), part, None) if module is not None else None
        if isinstance(module, nn.ModuleList):
            return prefix, module
    return None


def group_rows(parts: LayerParts, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q rows / o columns, k-v rows) of the given KV groups, as index tensors."""
    d, rep = parts.head_dim, parts.n_rep
    q = torch.cat([torch.arange(g * rep * d, (g + 1) * rep * d) for g in groups.tolist()]) if len(groups) else torch.zeros(0, dtype=torch.long)
    kv = torch.cat([torch.arange(g * d, (g + 1) * d) for g in groups.tolist()]) if len(groups) else torch.zeros(0, dtype=torch.long)
    return q, kv


def slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding only the given output rows / input columns of a dense layer."""
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    bias = layer.bias
    if bias is not None and rows is not None:
        bias = bias.detach()[rows.to(bias.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def slice_layer(model: nn.Module, parts: LayerParts, keep_groups: torch.Tensor, keep_channels: torch.Tensor) -> None:
    """Physically keep only `keep_groups` KV groups and `keep_channels` MLP channels of one plain layer."""
    from petkit.core.delta import get_canonical, set_canonical

    q_idx, kv_idx = group_rows(parts, keep_groups)
    for path, rows, cols in ((parts.q, q_idx, None), (parts.k, kv_idx, None), (parts.v, kv_idx, None),
                             (parts.o, None, q_idx), (parts.gate, keep_channels, None),
                             (parts.up, keep_channels, None), (parts.down, None, keep_channels)):
        set_canonical(model, path, slice_linear(get_canonical(model, path), rows, cols))
    attn = get_canonical(model, parts.q.rsplit(".", 1)[0])
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(keep_groups) * parts.n_rep
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(keep_groups)
