"""How methods read and write Hugging Face PEFT configs: shared pieces of their `peft_layout`s.

Each method declares its own `PeftLayout` (core.capabilities) beside its config; the LoRA family
(LoRA, DoRA) shares PEFT's "LORA" type and so its fields and tensor names, kept here once.
"""
from __future__ import annotations

from typing import Any

import torch

from petkit.core.capabilities import PeftLayout
from petkit.core.errors import AdapterStateError, ConfigError

from .lora_experts import experts_from_peft, experts_to_peft
from .lora_init import has_offset


def need(peft_config: dict[str, Any], key: str) -> Any:
    """A field PEFT always writes for this type; a clear error where the file lacks it."""
    if key not in peft_config:
        raise ConfigError(f"PEFT field {key!r} is missing")
    return peft_config[key]


def refuse(peft_config: dict[str, Any], key: str, allowed: Any, why: str) -> None:
    """Refuse a PEFT setting petkit cannot reproduce exactly."""
    if peft_config.get(key, allowed) != allowed:
        raise ConfigError(f"PEFT {key}={peft_config[key]!r}: {why}")


LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


def _lora_to_peft(config: Any, dora: bool) -> dict[str, Any]:
    bias = getattr(config, "bias", "none")
    if bias == "all":
        raise AdapterStateError("PEFT has no equivalent of bias='all' deltas; use bias='none' or 'lora_only'")
    # an init with a frozen offset exports s (B A - B0 A0) as one rank-2r LoRA, same scaling
    twice = has_offset(getattr(config, "init", "default"))
    alpha = config.alpha * ((2 ** 0.5 if config.rslora else 2) if twice else 1)
    params = getattr(config, "target_parameters", None)
    return {"r": config.r * (2 if twice else 1), "lora_alpha": alpha, "lora_dropout": config.dropout,
            "use_rslora": config.rslora, "bias": "none", "lora_bias": bias == "lora_only", "init_lora_weights": True,
            "use_dora": dora, "rank_pattern": {}, "alpha_pattern": {},
            "target_parameters": list(params) if params else None}


def fold_offsets(state: dict[str, Any]) -> dict[str, Any]:
    """`init_A` / `init_B` (a LoRA init's frozen start) folded into lora_A / lora_B: [A; A0], [B, -B0]."""
    out = {k: v for k, v in state.items() if not k.endswith((".init_A", ".init_B"))}
    for key in [k for k in state if k.endswith(".init_A")]:
        path = key[: -len(".init_A")]
        out[f"{path}.lora_A"] = torch.cat([state[f"{path}.lora_A"], state[key]])
        out[f"{path}.lora_B"] = torch.cat([state[f"{path}.lora_B"], -state[f"{path}.init_B"]], dim=1)
    return out


# PEFT inits whose saved factors only make sense on PEFT's edited (residual) base weight
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")


def _lora_from_peft(peft_config: dict[str, Any], dora: bool) -> dict[str, Any]:
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise ConfigError(f"PEFT init_lora_weights={init!r}: PEFT saved these factors for its own edited base weight "
                          "(W - B0 A0), which the folder does not hold; save it in PEFT with save_pretrained(..., "
                          "path_initial_model_for_weight_conversion=...) to get a plain LoRA petkit loads exactly")
    refuse(peft_config, "bias", "none", "PEFT bias='all'/'lora_only' trains base biases; petkit cannot import "
                                        "that exactly")
    if dora:
        refuse(peft_config, "lora_bias", False, "PEFT DoRA with lora_bias has no petkit equivalent")
    fields = {"r": int(need(peft_config, "r")), "alpha": float(need(peft_config, "lora_alpha")),
              "dropout": float(peft_config.get("lora_dropout", 0.0)),
              "rslora": bool(peft_config.get("use_rslora", False))}
    if dora:
        return fields
    params = peft_config.get("target_parameters")
    return {**fields, "bias": "lora_only" if peft_config.get("lora_bias") else "none",
            **({"target_parameters": list(params)} if params else {})}


def lora_layout(dora: bool) -> PeftLayout:
    """PEFT's "LORA" type: plain (LoRA, with `lora_B.bias` for bias='lora_only') or use_dora (DoRA)."""
    extra = {"magnitude": "lora_magnitude_vector"} if dora else {"lora_bias": "lora_B.bias"}
    return PeftLayout("LORA", {**LORA_KEYS, **extra}, to_peft=lambda c: _lora_to_peft(c, dora),
                      from_peft=lambda d: _lora_from_peft(d, dora),
                      matches=lambda d: bool(d.get("use_dora")) == dora, fan_in_fan_out=True,
                      to_state=fold_offsets, params_to_peft=experts_to_peft, params_from_peft=experts_from_peft)
