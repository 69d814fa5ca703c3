"""Sparse mixture of LoRA experts — SiRA (Zhu et al., 2023, "SiRA: Sparse Mixture of Low Rank
Adaptation", arXiv:2311.09179), with MoLA's layer-wise expert allocation (Gao et al., 2024,
"Higher Layers Need More LoRA Experts", arXiv:2402.08562).

Each wrapped layer holds E LoRA experts (A_e: (r, in), B_e: (out, r), B_e = 0 at init) and a
gate W_g: (E, in). Per token x:

    p = softmax(W_g x);  T = top-k(p);  g_e = p_e / sum_{j in T} p_j  for e in T, else 0
    h = W0 x + (alpha / r) * sum_e g_e B_e A_e x

Training only: expert capacity — each expert takes at most ceil(capacity_factor * tokens * k / E)
tokens of a forward, later tokens routed to a full expert get nothing from it — and expert
dropout on the gate outputs. `layer_experts` (MoLA) sets E per layer from a depth pattern:
(2, 4, 6, 8) splits the layers into four equal groups with 2, 4, 6 and 8 experts. Expert load:
`pk.expert_load(model, name)` and the `expert_imbalance` / `expert_dropped` training metrics.
Touches Linear / GPT-2 Conv1D layers (default: attention query and value). Not mergeable: the
gate depends on the input.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import ExpertRouted, ReportsMetrics, Weighted
from ..core.delta import DeltaModule, wrap
from ..core.errors import ConfigError
from .family.lowrank import check_lora_fields, factor_pair, linear_shape, weight_out_in
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import match_targets, role_targets


class SiraLinear(DeltaModule):
    def __init__(self, base: nn.Module, adapter_name: str, experts: int, r: int, alpha: float, top_k: int,
                 capacity_factor: float | None, expert_dropout: float, dropout: float) -> None:
        super().__init__(base, adapter_name)
        fan_in, fan_out, _ = linear_shape(base)
        like = weight_out_in(self)
        # expert e owns rows e*r:(e+1)*r of A and the same columns of B
        self.lora_A, self.lora_B = factor_pair(experts * r, fan_in, fan_out, like)
        self.gate = nn.Parameter(torch.empty(experts, fan_in, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.gate, a=math.sqrt(5))
        self.experts, self.r, self.top_k = experts, r, min(top_k, experts)
        self.scaling = alpha / r
        self.capacity_factor, self.expert_dropout = capacity_factor, expert_dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = 1.0
        self._counts = torch.zeros(experts)  # tokens each expert took (not state: not saved)
        self._logged = torch.zeros(experts)
        self._dropped = torch.zeros(2)  # [assignments dropped for capacity, assignments routed]

    def route(self, h: torch.Tensor) -> torch.Tensor:
        """Gate weights (tokens, E): top-k softmax, then capacity and expert dropout in training."""
        probs = F.linear(h, self.gate).float().softmax(dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
        if self.training and self.capacity_factor is not None:
            chosen = gates > 0
            capacity = math.ceil(self.capacity_factor * h.shape[0] * self.top_k / self.experts)
            keep = chosen & (chosen.cumsum(0) <= capacity)
            gates = gates * keep
            self._tally("_dropped", torch.stack([(chosen & ~keep).sum(), chosen.sum()]))
        self._tally("_counts", (gates > 0).sum(0))
        if self.training and self.expert_dropout > 0:
            gates = F.dropout(gates, self.expert_dropout)
        return gates.to(h.dtype)

    def _tally(self, counter: str, value: torch.Tensor) -> None:
        """Add to a counter kept on the input's device (no host sync per forward)."""
        current: torch.Tensor = getattr(self, counter)
        if current.device != value.device:
            current = current.to(value.device)
            setattr(self, counter, current)
        current.add_(value.detach().to(current.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = x.reshape(-1, x.shape[-1])
        gates = self.route(h).repeat_interleave(self.r, dim=1)  # (tokens, E * r)
        if self.dropout is not None:
            h = self.dropout(h)
        out = F.linear(F.linear(h, self.lora_A) * gates, self.lora_B)
        return y + out.reshape(y.shape) * (self.scaling * self.mix)

    def expert_counts(self, reset: bool = False) -> torch.Tensor:
        counts = self._counts.cpu().clone()
        if reset:
            self._counts.zero_()
            self._logged.zero_()
        return counts

    def train_metrics(self) -> dict[str, float]:
        """Load since the last call: max/mean expert share (1 = balanced) and capacity drops."""
        new = (self._counts - self._logged.to(self._counts.device)).cpu()
        self._logged = self._counts.clone()
        dropped, routed = self._dropped.tolist()
        self._dropped.zero_()
        out = {"expert_imbalance": float(new.max() / new.mean()) if new.sum() > 0 else 1.0}
        if self.capacity_factor is not None and routed:
            out["expert_dropped"] = dropped / routed
        return out


def layer_index(path: str) -> int | None:
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


def experts_per_path(paths: list[str], default: int, pattern: tuple[int, ...] | None) -> list[int]:
    """MoLA allocation: layer i of L gets pattern[i * len(pattern) // L] experts."""
    if pattern is None:
        return [default] * len(paths)
    layers = [layer_index(p) for p in paths]
    if any(i is None for i in layers):
        bad = paths[layers.index(None)]
        raise ConfigError(f"layer_experts needs numbered layers; {bad!r} has no layer index")
    depth = max(layers) + 1
    return [pattern[i * len(pattern) // depth] for i in layers]


@register("sira", family="reparameterised",
          paper="Zhu et al., 2023, SiRA: Sparse Mixture of Low Rank Adaptation; "
                "Gao et al., 2024, Higher Layers Need More LoRA Experts (MoLA)")
@dataclass(frozen=True)
class SiraConfig(MethodConfig):
    capabilities: ClassVar[tuple[type, ...]] = (Weighted, ExpertRouted, ReportsMetrics)
    r: int = 4  # rank of each expert
    alpha: float = 8.0
    dropout: float = 0.0
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float | None = 1.5  # None: no capacity limit
    expert_dropout: float = 0.0
    layer_experts: tuple[int, ...] | None = None  # MoLA: experts per depth group, e.g. (2, 4, 6, 8)

    def validate(self) -> None:
        check_lora_fields(self)
        check_range("num_experts", self.num_experts, 1, kind=int)
        if self.layer_experts is not None:
            if not isinstance(self.layer_experts, tuple) or not self.layer_experts:
                raise ConfigError("layer_experts must be None or a non-empty list of expert counts")
            for i, n in enumerate(self.layer_experts):
                check_range(f"layer_experts[{i}]", n, 1, kind=int)
        fewest = min(self.layer_experts) if self.layer_experts else self.num_experts
        check_range("top_k", self.top_k, 1, fewest, kind=int)
        if self.capacity_factor is not None:
            check_range("capacity_factor", self.capacity_factor, 0, low_open=True)
        check_range("expert_dropout", self.expert_dropout, 0.0, 0.999)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        targets = self.targets if self.targets is not None else role_targets(model, "attn_qv")
        paths = match_targets(model, targets)
        counts = experts_per_path(paths, self.num_experts, self.layer_experts)
        for path, experts in zip(paths, counts):
            wrap(model, path, SiraLinear, name, experts, self.r, self.alpha, self.top_k,
                 self.capacity_factor, self.expert_dropout, self.dropout)
        return paths
