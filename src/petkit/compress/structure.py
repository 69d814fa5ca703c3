"""The prunable structure of a Llama-style decoder or a BERT-style encoder, and the slicing that removes it.

Two kinds of structure per layer:

    KV group   one key/value head and the n_rep query heads that read it (grouped-query
               attention): rows of q_proj (n_rep * head_dim), k_proj and v_proj (head_dim
               each), columns of o_proj (n_rep * head_dim)
    channel    one MLP hidden unit: a row of gate_proj and up_proj, a column of down_proj
               (BERT: a row and bias of intermediate.dense, a column of output.dense)

Removing a group's o_proj columns (or a channel's down_proj column) already removes all its
effect, which is why training masks only those inputs (`gates.py`); the rows feeding them are
dead and go too when the model is sliced. Hugging Face configs hold one head count and one
intermediate size for all layers, so every layer keeps the same number of groups and channels
(each layer chooses which ones): pruning is uniform per layer.

BERT-style encoders are pruned in MLP channels only: transformers 5 derives a BERT head's width
from hidden_size / num_attention_heads and no longer reads `pruned_heads`, so a BERT with fewer
heads cannot be reloaded by `from_pretrained`; a smaller `intermediate_size` can.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from petkit.core.delta import canonical_modules, get_canonical, innermost, set_canonical
from petkit.core.errors import TargetError

NOT_PRUNABLE = "pruning needs a Llama-style decoder or a BERT-style encoder"


@dataclass(frozen=True)
class LayerParts:
    """Canonical module paths and sizes of one transformer layer."""

    index: int
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # a row (and bias) per channel: gate_proj, up_proj / intermediate.dense
    down: str  # a column per channel: down_proj / output.dense
    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    heads_prunable: bool = True  # False on BERT-style encoders (see the module docstring)

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    def attention(self) -> tuple[str, ...]:
        return self.q, self.k, self.v, self.o

    def mlp(self) -> tuple[str, ...]:
        return (*self.mlp_in, self.down)


@dataclass(frozen=True)
class UnitSizes:
    """Parameters of one layer's linear layers (weights and biases): per KV group, per channel, all."""

    group: int
    channel: int
    total: int


def prunable_layers(model: nn.Module) -> list[LayerParts]:
    """Every layer of a Llama-family decoder (q/k/v/o, gate/up/down) or a BERT-style encoder
    (query/key/value, attention.output.dense, intermediate.dense, output.dense)."""
    config = getattr(model, "config", None)
    found = _layer_list(model) if config is not None else None
    if found is None:
        raise TargetError(f"{NOT_PRUNABLE} (model.layers of attention + gated MLP, or encoder.layer of "
                          f"BertLayer); got {type(innermost(model)).__name__}")
    prefix, modules, encoder = found
    heads = config.num_attention_heads
    kv = heads if encoder else getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = []
    for i, layer in enumerate(modules):
        p = f"{prefix}.{i}"
        if encoder:
            if not _is_bert_layer(layer):
                raise TargetError(f"layer {i} is not a BertLayer (attention.self.query, intermediate, output)")
            out.append(LayerParts(i, f"{p}.attention.self.query", f"{p}.attention.self.key",
                                  f"{p}.attention.self.value", f"{p}.attention.output.dense",
                                  (f"{p}.intermediate.dense",), f"{p}.output.dense", heads, kv, head_dim,
                                  config.intermediate_size, heads_prunable=False))
            continue
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(innermost(mlp), "gate_proj"):
            raise TargetError(f"layer {i} has no self_attn / gated mlp: not a Llama-style decoder")
        out.append(LayerParts(i, f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj",
                              f"{p}.self_attn.o_proj", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
                              f"{p}.mlp.down_proj", heads, kv, head_dim, config.intermediate_size))
    return out


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList, bool] | None:
    """(path, layers, is_encoder) of the model's decoder layers or BERT encoder layers."""
    for prefix in ("model.layers", "layers", "model.model.layers"):
        module: nn.Module | None = model
        for part in prefix.split("."):
            module = getattr(innermost(module), part, None) if module is not None else None
        if isinstance(module, nn.ModuleList):
            return prefix, module, False
    for path, _, inner in canonical_modules(model):
        if (path == "encoder.layer" or path.endswith(".encoder.layer")) and isinstance(inner, nn.ModuleList) \
                and len(inner) and _is_bert_layer(inner[0]):
            return path, inner, True
    return None


def _is_bert_layer(layer: nn.Module) -> bool:
    def has(module: nn.Module | None, *path: str) -> bool:
        for part in path:
            module = getattr(innermost(module), part, None) if module is not None else None
        return module is not None

    return has(layer, "attention", "self", "query") and has(layer, "intermediate", "dense") \
        and has(layer, "output", "dense")


def unit_sizes(model: nn.Module, parts: LayerParts) -> UnitSizes:
    """Parameters removed with one KV group and with one MLP channel, and the layer's total, counted
    from its linear layers (weights + biases; norms are not counted)."""
    def dims(path: str) -> tuple[int, int, int]:
        layer = innermost(get_canonical(model, path))
        return layer.in_features, layer.out_features, int(getattr(layer, "bias", None) is not None)

    d, rep = parts.head_dim, parts.n_rep
    q, k, v, o = (dims(p) for p in parts.attention())
    group = rep * d * (q[0] + q[2]) + d * (k[0] + k[2]) + d * (v[0] + v[2]) + rep * d * o[1]
    channel = sum(i + b for i, _, b in map(dims, parts.mlp_in)) + dims(parts.down)[1]
    total = sum(i * n + b * n for i, n, b in map(dims, (*parts.attention(), *parts.mlp())))
    return UnitSizes(group, channel, total)


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
    """Physically keep only `keep_groups` KV groups and `keep_channels` MLP channels of one plain layer
    (an encoder's attention is left whole)."""
    cuts = [(path, keep_channels, None) for path in parts.mlp_in] + [(parts.down, None, keep_channels)]
    if parts.heads_prunable:
        q_idx, kv_idx = group_rows(parts, keep_groups)
        cuts += [(parts.q, q_idx, None), (parts.k, kv_idx, None), (parts.v, kv_idx, None), (parts.o, None, q_idx)]
    for path, rows, cols in cuts:
        set_canonical(model, path, slice_linear(get_canonical(model, path), rows, cols))
    if not parts.heads_prunable:
        return
    attn = get_canonical(model, parts.q.rsplit(".", 1)[0])
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(keep_groups) * parts.n_rep
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(keep_groups)
