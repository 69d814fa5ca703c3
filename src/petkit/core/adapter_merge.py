"""Weighted merges of several adapters into a NEW LoRA adapter; the inputs stay untouched.

With dW_i the (out, in) weight change of input i (scale included) and w_i its weight:

    linear  A = sum_i c_i A_i,  B = sum_i c_i B_i,  c_i = sqrt(|w_i| s_i) (sign of w_i on A)
            PEFT's "linear": same rank as the inputs; the cross terms B_i A_j make it approximate.
    cat     A = [A_1; ...; A_n],  B = [w_1 s_1 B_1, ..., w_n s_n B_n]:  exactly sum_i w_i dW_i,
            rank sum_i r_i.
    svd     sum_i w_i dW_i, then its best rank-r approximation (truncated SVD, Eckart-Young).
    ties    TIES-merging (Yadav et al., 2023): keep each dW_i's `density` largest-magnitude
            entries, elect per entry the sign of their sum, average the weighted entries that
            agree with it; then truncated SVD to rank r.
    dare    DARE (Yu et al., 2024): drop each entry of dW_i with probability 1 - density, rescale
            the rest by 1 / density (seeded), weighted sum; then truncated SVD to rank r.

linear and cat need low-rank inputs (`lowrank()`: lora, dylora, cola); svd, ties and dare take
any weight-change adapter (dora, krona, ...). Bias deltas and trained head copies
(`modules_to_save`) are combined linearly in every mode.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .delta import DeltaModule, get_canonical, innermost, iter_deltas
from .errors import AdapterStateError, ConfigError
from .io import adapter_state
from .capabilities import (FactorLoadable, FactorTarget, LowRank, Ranked, Weighted, capable_text,
                           lowrank_factors)
from .model import TrainableCopy, activate, attach, detach
from .state import adapters, check_known
from .targets import linear_shape
from .registry import METHODS, check_choice, check_range

HOWS = ("linear", "cat", "svd", "ties", "dare")


@dataclass
class _Parts:
    """What the inputs contribute at one module path, per input (weight applied later)."""

    factors: list[tuple[float, torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    dense: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    bias: torch.Tensor | None = None


def merge_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None = None, *,
                   name: str = "merged", how: str = "cat", r: int | None = None, density: float = 0.5,
                   seed: int = 0) -> nn.Module:
    """Combine adapters `names` (weights default 1.0) into a new LoRA adapter `name`, activated."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    _check_args(model, names, weights, name, how, r, density)
    parts: dict[str, _Parts] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    with _unit_mix(model, names):
        for adapter, weight in zip(names, weights):
            _collect(model, adapter, weight, how, parts, heads)
    rank = r or _default_rank(model, names, how)
    gen = torch.Generator().manual_seed(seed)
    factors = {p: _combine(pp, how, rank, density, gen) for p, pp in parts.items()}
    biases = {p: pp.bias for p, pp in parts.items() if pp.bias is not None}
    return lora_from_factors(model, name, factors, biases, heads)


def _check_args(model: nn.Module, names: list[str], weights: list[float], name: str, how: str,
                r: int | None, density: float) -> None:
    if not names:
        raise ConfigError("merge_adapters needs at least one adapter name")
    check_known(model, names)
    if name in adapters(model):
        raise AdapterStateError(f"an adapter named {name!r} is already attached; pick another name")
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be {len(names)} finite numbers (one per adapter), got {weights}")
    check_choice("how", how, HOWS)
    if r is not None:
        check_range("r", r, 1, kind=int)
        if how in ("linear", "cat"):
            raise ConfigError(f"r is the target rank of how='svd', 'ties' or 'dare'; "
                              f"how={how!r} keeps the inputs' ranks")
    check_range("density", density, 0.0, 1.0, low_open=True)
    merged = [w.adapter_name for _, w in iter_deltas(model) if w.adapter_name in names and w.merged]
    if merged:
        raise AdapterStateError(f"adapter(s) {sorted(set(merged))} are merged into the base; unmerge them first")


@contextlib.contextmanager
def _unit_mix(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Read each input's own delta, not its stacking weight."""
    saved = [(w, w.mix) for _, w in iter_deltas(model) if w.adapter_name in names and isinstance(w, Weighted)]
    for w, _ in saved:
        w.mix = 1.0
    try:
        yield
    finally:
        for w, mix in saved:
            w.mix = mix


def _collect(model: nn.Module, adapter: str, weight: float, how: str, parts: dict[str, _Parts],
             heads: dict[str, dict[str, torch.Tensor]]) -> None:
    method = adapters(model)[adapter].config.method
    for path, w in iter_deltas(model):
        if w.adapter_name != adapter:
            continue
        if isinstance(w, TrainableCopy):
            for pname, delta in w.merge_deltas().items():
                acc = heads.setdefault(path, {})
                acc[pname] = acc.get(pname, 0) + weight * delta.float()
            continue
        part = parts.setdefault(path, _Parts())
        _add_weight_part(w, path, adapter, method, weight, how, part)
        bias = w.delta_bias()
        if bias is not None:
            part.bias = (0 if part.bias is None else part.bias) + weight * bias.detach().float()


def _add_weight_part(w: DeltaModule, path: str, adapter: str, method: str, weight: float, how: str,
                     part: _Parts) -> None:
    try:
        _, _, transposed = linear_shape(w.base)
    except Exception:
        raise ConfigError(f"adapter {adapter!r} ({method}) changes {path!r}, which is not a linear "
                          "layer: it cannot become part of a LoRA") from None
    factors = lowrank_factors(w)
    if factors is not None:
        a, b, scale = factors
        part.factors.append((weight, a.detach().float(), b.detach().float(), float(scale)))
        return
    dw = w.delta_weight() if w.mergeable else None
    if dw is None:
        if w.mergeable and w.delta_bias() is not None:
            return  # a bias-only change (BitFit-style) on a linear layer
        raise ConfigError(f"adapter {adapter!r} ({method}) is not a weight change; it cannot be merged")
    if how in ("linear", "cat"):
        raise ConfigError(f"how={how!r} needs low-rank inputs ({capable_text(LowRank)}); {adapter!r} "
                          f"is {method!r}: use how='svd', 'ties' or 'dare'")
    part.dense.append((weight, (dw.T if transposed else dw).detach().float()))


def _default_rank(model: nn.Module, names: list[str], how: str) -> int:
    configs = [adapters(model)[n].config for n in names]
    ranks = [c.r if isinstance(c, Ranked) else None for c in configs]
    if how in ("linear", "cat"):
        return 0  # decided by the inputs
    if any(r is None for r in ranks):
        raise ConfigError(f"how={how!r} compresses to a rank: pass r=... (an input has no rank)")
    return max(ranks)


def _dense(parts: _Parts) -> list[tuple[float, torch.Tensor]]:
    """Each input's (weight, full (out, in) delta)."""
    low = [(w, s * (b @ a)) for w, a, b, s in parts.factors]
    return low + parts.dense


def _combine(parts: _Parts, how: str, rank: int, density: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not parts.factors and not parts.dense:
        return None  # bias only
    if how == "linear":
        return _linear(parts.factors)
    if how == "cat":
        a = torch.cat([a for _, a, _, _ in parts.factors], dim=0)
        b = torch.cat([b * (w * s) for w, _, b, s in parts.factors], dim=1)
        return a, b
    dense = _dense(parts)
    if how == "svd":
        total = sum(w * d for w, d in dense)
    elif how == "ties":
        total = ties(torch.stack([d for _, d in dense]), [w for w, _ in dense], density)
    else:
        total = sum(w * dare(d, density, gen) for w, d in dense)
    return svd_factors(total, rank)


def _linear(factors: list[tuple[float, torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {a.shape[0] for _, a, _, _ in factors}
    if len(ranks) > 1:
        raise ConfigError(f"how='linear' needs inputs of one rank, got ranks {sorted(ranks)}: use how='cat' or 'svd'")
    coef = [math.sqrt(abs(w) * s) for w, _, _, s in factors]
    a = sum(c * math.copysign(1.0, w) * a for c, (w, a, _, _) in zip(coef, factors))
    b = sum(c * b for c, (_, _, b, _) in zip(coef, factors))
    return a, b


def ties(deltas: torch.Tensor, weights: list[float], density: float) -> torch.Tensor:
    """TIES: trim to the top-`density` magnitudes, elect signs by the sum, disjoint mean."""
    k = max(1, int(round(density * deltas[0].numel())))
    flat = deltas.flatten(1)
    threshold = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat)).view_as(deltas)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    return (trimmed * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1 / density."""
    keep = torch.rand(delta.shape, generator=gen) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of `delta` (out, in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def lora_from_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None],
                      biases: dict[str, torch.Tensor] | None = None,
                      heads: dict[str, dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Attach a new LoRA adapter `name` whose delta at each path is exactly B @ A (+ bias).

    The method is the registered `FactorTarget` (LoRA). Ranks differing between paths are
    zero-padded to the largest; `heads` holds per-path head parameter *deltas* (added to the
    base's values for the new adapter's trained copies).
    """
    biases, heads = biases or {}, heads or {}
    targets = [p for p in factors if factors[p] is not None or p in biases]
    rank = max((f[0].shape[0] for f in factors.values() if f is not None), default=1)
    cfg = factor_target().for_factors(rank, targets, list(heads), bool(biases))
    attach(model, cfg, name)
    try:
        _fill(model, name, factors, biases, heads)
    except BaseException:
        detach(model, name)
        raise
    activate(model, name)
    return model


def factor_target() -> type[FactorTarget]:
    """The registered method that holds any low-rank delta exactly (declares `FactorTarget`)."""
    found = [info.config_cls for info in METHODS.values()
             if FactorTarget in info.config_cls.capabilities]
    if not found:
        raise ConfigError("no registered method declares FactorTarget (LoRA does; is "
                          "petkit.methods imported?)")
    return found[0]


def _fill(model: nn.Module, name: str, factors: dict, biases: dict, heads: dict) -> None:
    wrappers = {p: w for p, w in iter_deltas(model)
                if w.adapter_name == name and isinstance(w, FactorLoadable)}
    for path in set(factors) | set(biases):
        a, b = factors.get(path) or (None, None)
        wrappers[path].load_factors(a, b, biases.get(path))
    state = adapter_state(model, name)
    with torch.no_grad():
        for path, deltas in heads.items():
            base = innermost(get_canonical(model, path))
            for pname, delta in deltas.items():
                state[f"{path}.copy.{pname}"].copy_(base.get_parameter(pname).detach() + delta)
