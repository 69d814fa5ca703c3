"""LoRA on mixture-of-experts weights: parameter targets (`LoraConfig(target_parameters=...)`).

Since transformers v5 a MoE layer's experts are one module holding 3-D parameters, e.g. Mixtral's
`experts.gate_up_proj` (E, 2 ff, hidden) and `experts.down_proj` (E, hidden, ff), used as
`F.linear(x, W[e])`: there is no Linear per expert to wrap. `LoraExperts` wraps that module and
gives each targeted parameter, for each chosen expert e, its own rank-r pair:

    W'[e] = W[e] + s * B_e A_e            A: (E, r, in), B: (E, out, r), B = 0 at init

(s = alpha / r, or alpha / sqrt(r) with rsLoRA). W is (E, out, in); a module that declares
`is_transposed` (gpt-oss) stores (E, in, out), and W'[e] adds the transpose. The forward calls
the wrapped module with W' in place of W (`torch.func.functional_call`), so any expert kernel
runs unchanged; wrappers stack (each adds its delta to what it is handed). Experts not chosen
(`experts=(0, 3)`) keep W[e]. No dropout: it cannot be factored out of W' x (PEFT refuses it too).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from petkit.core.delta import DeltaModule, innermost, iter_deltas
from petkit.core.errors import AdapterLoadError, TargetError
from petkit.core.targets import match_parameters


def expert_dims(module: nn.Module, pname: str) -> tuple[int, int, int, bool]:
    """(experts, in, out, transposed) of 3-D parameter `pname` of `module` (not transposed:
    (E, out, in), read as `F.linear(x, W[e])`)."""
    param = getattr(module, pname)
    if param.ndim != 3:
        raise TargetError(f"parameter target {pname!r} of {type(module).__name__} has shape {tuple(param.shape)}; "
                          "target_parameters names 3-D expert parameters (target a 2-D weight's module instead)")
    transposed = bool(getattr(module, "is_transposed", False))
    experts, first, second = param.shape
    return (experts, first, second, True) if transposed else (experts, second, first, False)


class LoraExperts(DeltaModule):
    """LoRA factors for some 3-D parameters of one module (all experts or the chosen ones)."""

    def __init__(self, base: nn.Module, adapter_name: str, params: list[str], r: int, alpha: float,
                 rslora: bool, init: str = "default", experts: tuple[int, ...] | None = None) -> None:
        super().__init__(base, adapter_name)
        inner = innermost(base)
        self.params = list(params)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.mix = 1.0
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        count = expert_dims(inner, self.params[0])[0]
        chosen = range(count) if experts is None else experts
        bad = [e for e in chosen if e >= count]
        if bad:
            raise TargetError(f"experts {bad} out of range: {type(inner).__name__} has {count} experts (0..{count - 1})")
        self.register_buffer("expert_ids", torch.tensor(list(chosen), dtype=torch.long), persistent=False)
        for pname in self.params:
            _, fan_in, fan_out, _ = expert_dims(inner, pname)
            weight = getattr(inner, pname)
            kw = {"dtype": weight.dtype, "device": weight.device}
            a = torch.empty(len(chosen), r, fan_in, **kw)
            if init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:  # PEFT's Kaiming-uniform draw of its (r E, in) lora_A: bound 1 / sqrt(in)
                nn.init.kaiming_uniform_(a.view(-1, fan_in), a=math.sqrt(5))
            self.lora_A[pname] = nn.Parameter(a)
            self.lora_B[pname] = nn.Parameter(torch.zeros(len(chosen), fan_out, r, **kw))
        self.notes.append(f"{', '.join(self.params)}: experts {'all' if experts is None else list(chosen)}")

    def expert_delta(self, pname: str) -> torch.Tensor:
        """s * B_e A_e for the chosen experts, (E_chosen, ...) in the parameter's own layout."""
        b, a = self.lora_B[pname], self.lora_A[pname]
        transposed = expert_dims(innermost(self.base), pname)[3]
        delta = torch.matmul(a.transpose(1, 2), b.transpose(1, 2)) if transposed else torch.matmul(b, a)
        return delta * (self.scaling * self.mix)

    def full_delta(self, pname: str, like: torch.Tensor) -> torch.Tensor:
        """The delta for every expert (zero for those not chosen), shaped like the parameter."""
        delta = self.expert_delta(pname).to(like.dtype)
        if delta.shape[0] == like.shape[0]:
            return delta
        return torch.zeros_like(like).index_add(0, self.expert_ids, delta)

    def forward(self, *args, **kwargs):
        if not self.enabled:
            return self.base(*args, **kwargs)
        inner, prefix = innermost(self.base), "base." * _depth(self.base)
        swapped = {}
        for pname in self.params:
            weight = getattr(inner, pname)  # what this wrapper is handed (a stacked one's W' too)
            swapped[prefix + pname] = weight + self.full_delta(pname, weight)
        return functional_call(self.base, swapped, args, kwargs, strict=False)

    def merge_deltas(self) -> dict[str, torch.Tensor]:
        """MergesOwnDeltas: each targeted parameter's change, every expert."""
        inner = innermost(self.base)
        return {p: self.full_delta(p, getattr(inner, p)).detach() for p in self.params}


def _depth(module: nn.Module) -> int:
    """How many wrappers stand between `module` and its innermost base."""
    depth = 0
    while isinstance(module, DeltaModule):
        depth, module = depth + 1, module.base
    return depth


# PEFT 0.21 (`LoraConfig(target_parameters=...)`, lora.ParamWrapper) holds one parameter's factors
# for all E experts as lora_A (r E, in) with A_e = A.reshape(E, r, in)[e] and lora_B (out, r E)
# with B_e = B.reshape(out, r, E)[:, :, e]. Several parameters of one module are nested wrappers
# in the order the module registered them: the first is `<path>.base_layer.lora_A`, the last
# `<path>.lora_A` (n parameters: n - 1 - k times `base_layer.` for the k-th).
PEFT_PREFIX = "base_model.model."


def _peft_names(path: str, params: list[str]) -> dict[str, str]:
    """{parameter name: PEFT's module path of its factors} for one module's targeted parameters."""
    return {p: f"{path}.{'base_layer.' * (len(params) - 1 - k)}".rstrip(".") for k, p in enumerate(params)}


def experts_to_peft(model: nn.Module, name: str, state: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PeftLayout.params_to_peft: adapter `name`'s expert factors under PEFT's names and shapes
    (experts not chosen get zero factors: no change, as here)."""
    rest, out = dict(state), {}
    for path, w in iter_deltas(model):
        if w.adapter_name != name or not isinstance(w, LoraExperts):
            continue
        inner = innermost(w.base)
        for pname, where in _peft_names(path, w.params).items():
            a, b = rest.pop(f"{path}.lora_A.{pname}"), rest.pop(f"{path}.lora_B.{pname}")
            count = expert_dims(inner, pname)[0]
            full_a = a.new_zeros(count, *a.shape[1:]).index_copy(0, w.expert_ids.to(a.device), a.detach())
            full_b = b.new_zeros(count, *b.shape[1:]).index_copy(0, w.expert_ids.to(b.device), b.detach())
            out[f"{PEFT_PREFIX}{where}.lora_A.weight"] = full_a.reshape(-1, a.shape[-1])
            out[f"{PEFT_PREFIX}{where}.lora_B.weight"] = full_b.permute(1, 2, 0).reshape(b.shape[1], -1)
    return rest, out


def experts_from_peft(model: nn.Module, peft_config: dict, tensors: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PeftLayout.params_from_peft: PEFT's `target_parameters` factors as petkit's
    `<path>.lora_A.<param>` (E, r, in) and `<path>.lora_B.<param>` (E, out, r)."""
    entries = peft_config.get("target_parameters")
    if not entries:
        return tensors, {}
    rank, rest, out = int(peft_config["r"]), dict(tensors), {}
    for path, params in match_parameters(model, list(entries)).items():
        for pname, where in _peft_names(path, params).items():
            keys = [f"{PEFT_PREFIX}{where}.lora_{f}.weight" for f in "AB"]
            missing = [k for k in keys if k not in rest]
            if missing:
                raise AdapterLoadError(f"target_parameters names {path}.{pname}, but the file has no {missing[0]!r}")
            if f"{PEFT_PREFIX}{where}.lora_B.bias" in rest:
                raise AdapterLoadError(f"{path}.{pname}: PEFT lora_bias on a parameter target has no petkit equivalent")
            a, b = rest.pop(keys[0]), rest.pop(keys[1])
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] % rank or b.shape[1] != a.shape[0]:
                raise AdapterLoadError(f"{keys[0]}: shapes {tuple(a.shape)} / {tuple(b.shape)} are not PEFT's "
                                       f"(r E, in) / (out, r E) with r = {rank}")
            count = a.shape[0] // rank
            out[f"{path}.lora_A.{pname}"] = a.reshape(count, rank, a.shape[1])
            out[f"{path}.lora_B.{pname}"] = b.reshape(b.shape[0], rank, count).permute(2, 0, 1).contiguous()
    return rest, out
