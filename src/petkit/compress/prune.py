"""Pruning while tuning: LoRAPrune (Zhang et al., 2024) and APT (Zhao et al., 2024).

    pk.attach(model, pk.LoraConfig(r=8, targets="all-linear"))
    pruner = pk.start_pruning(model, pk.PruneConfig(sparsity=0.5))      # gates + gradient hooks
    pk.train(model, data, config)                                      # the schedule runs per step
    report = pk.finish_pruning(model)        # merge LoRA, slice, shrink the config: a plain model
    model.save_pretrained("out/pruned")      # from_pretrained loads the smaller shapes

LoRAPrune: structured units are KV groups (a key/value head with its query heads: GQA is never
broken) and MLP channels; importance comes from the LoRA factors' gradients only
(`importance.py`), smoothed by a moving average; the pruned fraction of decoder-block
parameters follows a cubic schedule from `start` to `end` (fractions of training) up to
`sparsity`; every layer prunes the same number of groups and channels (HF Llama configs hold
one size for all layers), each layer choosing its own least important ones. Attention is pruned
by whole groups (floor(sparsity * kv_heads)); the MLP takes the rest so the block-parameter
sparsity hits the target.

APT (method="apt"): the same pruning, ending early (`end`, default 0.3), while LoRA ranks grow:
LoRA starts with `init_rank` of its r ranks live; every `grow_every` steps until `end`, the
`grow_fraction` most salient LoRA layers (moving average of sum |theta ⊙ grad| over their
factors) get `grow_rank` more. New ranks start with B = 0, so growing never changes the output.
Not included: APT's self-distillation and its layer-wise (non-uniform) pruning.

BERT-style encoders are pruned in MLP channels only (transformers 5 cannot reload a BERT with
fewer heads, see `structure.py`): `sparsity` is still the fraction of block parameters removed,
reached from the channels alone, so it is capped below the MLP's share of the block (about 2/3
for a 4x-wide MLP); a target beyond the cap is a ConfigError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from petkit.compress.gates import PruneGate
from petkit.compress.importance import GradStash, cubic_sparsity, floor_count, watch_layer, weight_importance
from petkit.compress.structure import LayerParts, prunable_layers, slice_layer, unit_sizes
from petkit.core.delta import iter_deltas, unwrap, wrap
from petkit.core.errors import AdapterStateError, ConfigError
from petkit.core.model import unload
from petkit.core.registry import check_choice, check_range

PRUNER_ATTR = "_petkit_pruner"


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = 0.5  # fraction of block (attention + MLP linear) parameters removed
    method: str = "loraprune"  # loraprune | apt
    start: float = 0.0  # fraction of training before pruning starts
    end: float | None = None  # fraction at which the target is reached (loraprune 0.7, apt 0.3)
    every: int = 5  # steps between mask updates
    ema: float = 0.9  # moving average of importance
    attention: bool = True  # prune KV groups as well as MLP channels (decoders; encoders never)
    init_rank: int = 2  # apt: live ranks at the start
    grow_rank: int = 2  # apt: ranks added per growth
    grow_every: int = 10  # apt: steps between growths
    grow_fraction: float = 0.25  # apt: share of LoRA layers that grow each time

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 0.95, low_open=True)
        check_choice("method", self.method, ("loraprune", "apt"))
        check_range("start", self.start, 0.0, 1.0)
        if self.end is not None:
            check_range("end", self.end, self.start, 1.0, low_open=True)
        check_range("every", self.every, 1, kind=int)
        check_range("ema", self.ema, 0.0, 0.999)
        for name in ("init_rank", "grow_rank", "grow_every"):
            check_range(name, getattr(self, name), 1, kind=int)
        check_range("grow_fraction", self.grow_fraction, 0.0, 1.0, low_open=True)

    @property
    def end_fraction(self) -> float:
        return self.end if self.end is not None else (0.3 if self.method == "apt" else 0.7)


@dataclass
class LayerState:
    parts: LayerParts
    attn_gate: PruneGate | None  # None where heads are not pruned (BERT-style encoders)
    mlp_gate: PruneGate
    wrappers: dict[str, nn.Module]
    groups: torch.Tensor
    channels: torch.Tensor
    pruned_groups: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    pruned_channels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


class Pruner:
    """Drives the masks (and APT's rank growth) from the training loop's step hook."""

    def __init__(self, model: nn.Module, config: PruneConfig, name: str) -> None:
        self.model, self.config, self.name = model, config, name
        self.stash = GradStash()
        self.last_step = -1
        parts = prunable_layers(model)
        for p in parts:
            self.counts(p, config.sparsity)  # a target out of reach fails before anything is wrapped
        self.layers = [self._layer(p) for p in parts]
        self.ranks = RankGrowth(self.layers, config) if config.method == "apt" else None
        self.sparsity = 0.0

    def _layer(self, parts: LayerParts) -> LayerState:
        wrappers = watch_layer(self.model, parts.attention() + parts.mlp(), self.stash)
        tag = f"{self.name}.prune"
        attn = wrap(self.model, parts.o, PruneGate, tag, parts.heads * parts.head_dim,
                    parts.n_rep * parts.head_dim, self.on_step) if parts.heads_prunable else None
        mlp = wrap(self.model, parts.down, PruneGate, tag, parts.channels, 1, self.on_step)
        return LayerState(parts, attn, mlp, wrappers, torch.zeros(parts.kv_heads), torch.zeros(parts.channels))

    def on_step(self, step: int, total: int) -> None:
        if step == self.last_step:  # every gate forwards the same call
            return
        self.last_step = step
        if self.stash.grads:
            if self.ranks is not None:  # before the importance pops the factors' gradients
                self.ranks.observe(self.stash)
            for layer in self.layers:
                self._accumulate(layer)
        self.stash.grads.clear()
        cfg = self.config
        if step and (step % cfg.every == 0 or step == total):
            self.sparsity = cubic_sparsity(step, total, cfg.sparsity, cfg.start, cfg.end_fraction)
            for layer in self.layers:
                self._apply(layer, *self.counts(layer.parts, self.sparsity))
        if self.ranks is not None and step and step % cfg.grow_every == 0 and step <= cfg.end_fraction * total:
            self.ranks.grow()

    def _accumulate(self, layer: LayerState) -> None:
        p, b = layer.parts, self.config.ema
        scored = layer.wrappers.items() if p.heads_prunable else \
            [(path, w) for path, w in layer.wrappers.items() if path in p.mlp()]
        groups, channels = torch.zeros(p.kv_heads), torch.zeros(p.channels)
        for path, w in scored:
            i = weight_importance(w, self.stash)
            if i is None:
                continue
            if path in (p.q, p.k, p.v):
                groups += i.sum(1).view(p.kv_heads, -1).sum(1).cpu()
            elif path == p.o:
                groups += i.sum(0).view(p.kv_heads, -1).sum(1).cpu()
            elif path in p.mlp_in:
                channels += i.sum(1).cpu()
            else:
                channels += i.sum(0).cpu()
        layer.groups.mul_(b).add_(groups, alpha=1 - b)
        layer.channels.mul_(b).add_(channels, alpha=1 - b)

    def counts(self, p: LayerParts, sparsity: float) -> tuple[int, int]:
        """(KV groups, MLP channels) pruned per layer at `sparsity` on the way to the target.

        At the target, block parameters drop by `config.sparsity`: floor(target * kv_heads)
        groups (none on an encoder) and the MLP channels that make up the rest; on the way, both
        counts scale with sparsity / target (so neither overshoots its final count). A target the
        channels cannot make up (one must stay) raises ConfigError naming the reachable maximum.
        """
        target, size = self.config.sparsity, unit_sizes(self.model, p)
        groups = floor_count(target, p.kv_heads) if self.config.attention and p.heads_prunable else 0
        channels = max(0, round((target * size.total - groups * size.group) / size.channel))
        if channels > p.channels - 1:
            reach = (groups * size.group + (p.channels - 1) * size.channel) / size.total
            how = "MLP channels alone (a BERT-style encoder keeps its heads)" if not p.heads_prunable else \
                f"{groups} KV group(s) and MLP channels" if self.config.attention else \
                "MLP channels alone (attention=False)"
            raise ConfigError(f"sparsity={target} is out of reach on this model: {how} remove at most "
                              f"{reach:.3f} of the block parameters")
        share = sparsity / target
        return int(groups * share + 1e-9), round(channels * share)

    def _apply(self, layer: LayerState, groups: int, channels: int) -> None:
        layer.pruned_groups = _grow(layer.pruned_groups, layer.groups, groups)
        layer.pruned_channels = _grow(layer.pruned_channels, layer.channels, channels)
        if layer.attn_gate is not None:
            layer.attn_gate.set_pruned(layer.pruned_groups)
        layer.mlp_gate.set_pruned(layer.pruned_channels)

    def close(self) -> None:
        self.stash.close()
        if self.ranks is not None:
            self.ranks.close()
        for layer in self.layers:
            for gate, path in ((layer.attn_gate, layer.parts.o), (layer.mlp_gate, layer.parts.down)):
                if gate is not None:
                    unwrap(self.model, path, gate)


def _grow(pruned: torch.Tensor, importance: torch.Tensor, count: int) -> torch.Tensor:
    """Add the least important live units to `pruned` until it holds `count` (never un-prunes)."""
    if count <= len(pruned):
        return pruned
    live = torch.ones(len(importance), dtype=torch.bool)
    live[pruned] = False
    order = torch.argsort(torch.where(live, importance, torch.inf))
    return torch.cat([pruned, order[: count - len(pruned)]]).sort().values


class RankGrowth:
    """APT's adaptive ranks: gradient masks over LoRA ranks, opened in the most salient layers."""

    def __init__(self, layers: list[LayerState], config: PruneConfig) -> None:
        self.config = config
        self.wrappers = [w for layer in layers for w in layer.wrappers.values()]
        self.masks, self.handles, self.salience = [], [], torch.zeros(len(self.wrappers))
        for w in self.wrappers:
            a, b, _ = w.lowrank()
            mask = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
            mask[: config.init_rank] = 1
            with torch.no_grad():
                b.mul_(mask[None, :])  # closed ranks contribute nothing
            self.handles += [a.register_hook(lambda g, m=mask: g * m[:, None]),
                             b.register_hook(lambda g, m=mask: g * m[None, :])]
            self.masks.append(mask)

    def observe(self, stash: GradStash) -> None:
        now = torch.zeros(len(self.wrappers))
        for i, w in enumerate(self.wrappers):
            a, b, _ = w.lowrank()
            for p in (a, b):
                g = stash.grads.get(id(p))
                if g is not None:
                    now[i] += float((p.detach() * g).abs().sum())
        self.salience.mul_(self.config.ema).add_(now, alpha=1 - self.config.ema)

    def grow(self) -> None:
        n = max(1, round(self.config.grow_fraction * len(self.wrappers)))
        for i in torch.argsort(self.salience, descending=True)[:n].tolist():
            mask = self.masks[i]
            live = int(mask.sum())
            mask[live: live + self.config.grow_rank] = 1

    def live_parameters(self) -> int:
        """LoRA parameters in open ranks (the ones that train)."""
        return sum(int(m.sum()) * self._per_rank(w) for w, m in zip(self.wrappers, self.masks))

    def allocated_parameters(self) -> int:
        """LoRA parameters allocated (every rank, open or closed)."""
        return sum(len(m) * self._per_rank(w) for w, m in zip(self.wrappers, self.masks))

    @staticmethod
    def _per_rank(wrapper: Any) -> int:
        a, b, _ = wrapper.lowrank()
        return a.shape[1] + b.shape[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def start_pruning(model: nn.Module, config: PruneConfig | None = None, name: str = "default") -> Pruner:
    """Put pruning gates and gradient hooks on a LoRA-tuned Llama-style decoder or BERT-style
    encoder; train it next."""
    if PRUNER_ATTR in model.__dict__:
        raise AdapterStateError("pruning already started on this model")
    if not any(w.adapter_name == name for _, w in iter_deltas(model)):
        raise AdapterStateError(f"no adapter named {name!r}: attach a LoRA (targets='all-linear') first")
    pruner = Pruner(model, config or PruneConfig(), name)
    model.__dict__[PRUNER_ATTR] = pruner
    return pruner


def finish_pruning(model: nn.Module) -> dict:
    """Merge the LoRA, slice away the pruned groups and channels, shrink the config; a plain model.

    Returns what was kept: heads, KV heads (None on an encoder), intermediate size, parameters
    before and after.
    """
    pruner: Pruner | None = model.__dict__.pop(PRUNER_ATTR, None)
    if pruner is None:
        raise ConfigError("finish_pruning needs start_pruning (and training) first")
    kept = [(layer.parts, _kept_groups(layer), layer.mlp_gate.kept()) for layer in pruner.layers]
    ranks = pruner.ranks
    live_lora = ranks.live_parameters() if ranks is not None else None
    allocated_lora = ranks.allocated_parameters() if ranks is not None else None
    pruner.close()
    unload(model, merge=True)
    before = sum(p.numel() for p in model.parameters())
    for parts, groups, channels in kept:
        slice_layer(model, parts, groups, channels)
    parts, groups, channels = kept[0]
    config = model.config
    if parts.heads_prunable:
        config.head_dim = parts.head_dim
        config.num_key_value_heads = len(groups)
        config.num_attention_heads = len(groups) * parts.n_rep
    config.intermediate_size = len(channels)
    after = sum(p.numel() for p in model.parameters())
    return {"num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": len(groups) if parts.heads_prunable else None,
            "intermediate_size": len(channels), "parameters_before": before, "parameters_after": after,
            "sparsity_reached": pruner.sparsity, "apt_live_lora_parameters": live_lora,
            "apt_allocated_lora_parameters": allocated_lora}


def _kept_groups(layer: LayerState) -> torch.Tensor:
    if layer.attn_gate is None:
        return torch.arange(layer.parts.kv_heads)
    return layer.attn_gate.kept()
