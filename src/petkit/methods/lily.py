"""Lily — Zhong et al., 2024, "Low-Rank Interconnected Adaptation across Layers" (arXiv:2407.09946).

    h = W0 x + s * (A x) B(x)          A: (r, in), shared by `stride_A` consecutive layers
    B(x) = sum_e p_e B_e               B_e: (r, out), num_B of them shared by every layer
    p = mean over the batch's tokens of softmax(R (A x))    R: (num_B, r), the layer's own router

Layers of one kind (same module name, same weight shape: every `q_proj`) share their projectors:
A per block of `stride_A` consecutive layers, the `num_B` B's across all of them; each layer
routes among the B's with its own router, from the mean of its tokens' routing probabilities. B = 0
at init (identity). Not mergeable: the combination of B's depends on the batch. Touches Linear /
GPT-2 Conv1D layers (default: attention query and value). Names, shapes and the forward follow
PEFT 0.21's `LilyConfig` (`lily_A` (r, in), `lily_B` (num_B r, out), `lily_router` (num_B, r)),
so adapters exchange with PEFT; PEFT groups layers by the `target_modules` entry that matched
them, petkit by module name (the same for target names such as "q_proj", as PEFT writes them).
A shared tensor is saved once, with the first layer of its group (PEFT repeats it per layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.capabilities import PeftLayout
from ..core.delta import DeltaModule, canonical_modules, get_canonical, innermost, iter_deltas, wrap
from ..core.errors import AdapterLoadError, AdapterStateError
from ..core.registry import MethodConfig, check_range, register
from ..core.targets import is_linear, linear_dims, match_targets, role_targets
from .family.peft_fields import need


def _kaiming(shape: tuple[int, int], kw: dict[str, Any]) -> torch.Tensor:
    out = torch.empty(shape, **kw)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5))
    return out


def peft_draws(r: int, fan_in: int, fan_out: int, num_b: int, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and the router (num_B, r), drawn as PEFT draws them for every layer (a follower
    too), so that one seed starts both libraries from the same adapter: PEFT's `nn.Linear`s for
    A, B and the router initialise themselves first (those values are then replaced), then A and
    the router are drawn again (Kaiming-uniform) and B is zeroed."""
    for shape in ((r, fan_in), (num_b * r, fan_out), (num_b, r)):
        _kaiming(shape, kw)
    a = _kaiming((r, fan_in), kw)
    return a, _kaiming((num_b, r), kw)


class LilyLinear(DeltaModule):
    """One layer of a Lily adapter: its own router; A and B its own or its group leader's."""

    def __init__(self, base: nn.Module, adapter_name: str, r: int, num_b: int, scaling: float,
                 a_from: "LilyLinear | None", b_from: "LilyLinear | None") -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        fan_in, fan_out, _ = linear_dims(inner)
        kw = {"dtype": inner.weight.dtype, "device": inner.weight.device}
        self.num_b, self.scaling = num_b, scaling
        a, router = peft_draws(r, fan_in, fan_out, num_b, kw)
        self.lily_router = nn.Parameter(router)
        if a_from is None:
            self.lily_A = nn.Parameter(a)
        if b_from is None:
            self.lily_B = nn.Parameter(torch.zeros(num_b * r, fan_out, **kw))
        # a follower reads its leader's factors (not registered here: saved and trained once)
        self.__dict__["a_from"], self.__dict__["b_from"] = a_from, b_from

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (num_B r, out)) this layer uses."""
        a = self.lily_A if self.a_from is None else self.a_from.lily_A
        b = self.lily_B if self.b_from is None else self.b_from.lily_B
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.factors()
        hidden = x.to(a.dtype) @ a.T
        probs = torch.softmax(hidden @ self.lily_router.T, dim=-1).reshape(-1, self.num_b).mean(dim=0)
        combined = torch.einsum("e,eio->io", probs, b.reshape(self.num_b, -1, b.shape[1]))
        return y + ((hidden @ combined) * self.scaling).to(y.dtype)


def groups(model: nn.Module, paths: list[str]) -> list[list[str]]:
    """`paths` (model order) grouped by module name and weight shape: the layers that share."""
    out: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for path in paths:
        weight = innermost(get_canonical(model, path)).weight
        out.setdefault((path.rpartition(".")[2], tuple(weight.shape)), []).append(path)
    return list(out.values())


def leaders(model: nn.Module, paths: list[str], stride: int) -> dict[str, tuple[str, str]]:
    """{path: (its A's owner, its B's owner)}: blocks of `stride` layers share A, a group shares B."""
    out = {}
    for group in groups(model, paths):
        for i, path in enumerate(group):
            out[path] = (group[(i // stride) * stride], group[0])
    return out


def _lily_wrappers(model: nn.Module, name: str) -> dict[str, LilyLinear]:
    return {p: w for p, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, LilyLinear)}


def _to_peft_tensors(model: nn.Module, name: str, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every layer's A and B under its own name (PEFT's file repeats shared tensors per layer)."""
    wrappers = _lily_wrappers(model, name)
    for path, w in wrappers.items():
        if not isinstance(innermost(w), nn.Linear):
            raise AdapterStateError(f"PEFT's Lily takes nn.Linear layers only; {path!r} is {type(innermost(w)).__name__}")
        a, b = w.factors()
        state = {**state, f"{path}.lily_A": a.detach().clone(), f"{path}.lily_B": b.detach().clone()}
    names = {p.rpartition(".")[2] for p in wrappers}
    more = [p for p, _, inner in _linear_paths(model) if p.rpartition(".")[2] in names and p not in wrappers]
    if more:
        raise AdapterStateError(f"PEFT's Lily would adapt every layer named like its targets, also {more[0]!r}, "
                                "which this adapter leaves alone; target whole module names to export it")
    return state, {}


def _linear_paths(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    return [(p, o, i) for p, o, i in canonical_modules(model) if p and is_linear(i)]


def _from_peft_tensors(model: nn.Module, peft_config: dict[str, Any], tensors: dict[str, Any]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """PEFT's per-layer copies of shared tensors checked against their group leader's, then dropped."""
    prefix, router = "base_model.model.", ".lily_router.weight"
    paths = [k[len(prefix):-len(router)] for k in tensors if k.startswith(prefix) and k.endswith(router)]
    order = {p: i for i, (p, _, _) in enumerate(_linear_paths(model))}
    paths = sorted((p for p in paths if p in order), key=order.__getitem__)
    rest = dict(tensors)
    for path, owners in leaders(model, paths, int(need(peft_config, "stride_A"))).items():
        for factor, owner in zip("AB", owners):
            if owner == path:
                continue
            key, lead = f"{prefix}{path}.lily_{factor}.weight", f"{prefix}{owner}.lily_{factor}.weight"
            if key in rest and lead in rest and not torch.equal(rest[key], rest[lead]):
                raise AdapterLoadError(f"{key} differs from {lead}, which its layers share in Lily")
            rest.pop(key, None)
    return rest, {}


PEFT = PeftLayout(
    "LILY", {"lily_A": "lily_A.weight", "lily_B": "lily_B.weight", "lily_router": "lily_router.weight"},
    to_peft=lambda c: {"r": c.r, "stride_A": c.stride_A, "num_B": c.num_B, "scaling": c.scaling,
                       "init_weights": True},
    from_peft=lambda d: {"r": int(need(d, "r")), "stride_A": int(need(d, "stride_A")),
                         "num_B": int(need(d, "num_B")), "scaling": float(need(d, "scaling"))},
    params_to_peft=_to_peft_tensors, params_from_peft=_from_peft_tensors,
    target_names=lambda paths: sorted({p.rpartition(".")[2] for p in paths}))


@register("lily", family="reparameterised",
          paper="Zhong et al., 2024, Low-Rank Interconnected Adaptation across Layers (Lily)")
@dataclass(frozen=True)
class LilyConfig(MethodConfig):
    peft_layout: ClassVar[PeftLayout | None] = PEFT
    r: int = 32
    stride_A: int = 1  # consecutive layers of one kind sharing an A
    num_B: int = 2  # B projectors shared by all layers of one kind
    scaling: float = 1.0

    def validate(self) -> None:
        check_range("r", self.r, 1, kind=int)
        check_range("stride_A", self.stride_A, 1, kind=int)
        check_range("num_B", self.num_B, 2, kind=int)
        check_range("scaling", self.scaling)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        paths = match_targets(model, self.targets if self.targets is not None else role_targets(model, "attn_qv"))
        made: dict[str, LilyLinear] = {}
        owners = leaders(model, paths, self.stride_A)
        for path in paths:  # in model order, as PEFT creates (and draws) its layers
            a_owner, b_owner = owners[path]
            made[path] = wrap(model, path, LilyLinear, name, self.r, self.num_B, self.scaling,
                              made[a_owner] if a_owner != path else None, made[b_owner] if b_owner != path else None)
        return paths
