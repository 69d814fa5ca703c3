"""How methods read and write Hugging Face PEFT configs: shared pieces of their `peft_layout`s.

Each method declares its own `PeftLayout` (core.capabilities) beside its config; the LoRA family
(LoRA, DoRA) shares PEFT's "LORA" type and so its fields and tensor names, kept here once.
"""
from __future__ import annotations

from typing import Any

from petkit.core.capabilities import PeftLayout
from petkit.core.errors import AdapterStateError, ConfigError


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
    return {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
            "bias": "none", "lora_bias": bias == "lora_only", "init_lora_weights": True, "use_dora": dora,
            "rank_pattern": {}, "alpha_pattern": {}}


def _lora_from_peft(peft_config: dict[str, Any], dora: bool) -> dict[str, Any]:
    refuse(peft_config, "bias", "none", "PEFT bias='all'/'lora_only' trains base biases; petkit cannot import "
                                        "that exactly")
    if dora:
        refuse(peft_config, "lora_bias", False, "PEFT DoRA with lora_bias has no petkit equivalent")
    fields = {"r": int(need(peft_config, "r")), "alpha": float(need(peft_config, "lora_alpha")),
              "dropout": float(peft_config.get("lora_dropout", 0.0)),
              "rslora": bool(peft_config.get("use_rslora", False))}
    return fields if dora else {**fields, "bias": "lora_only" if peft_config.get("lora_bias") else "none"}


def lora_layout(dora: bool) -> PeftLayout:
    """PEFT's "LORA" type: plain (LoRA, with `lora_B.bias` for bias='lora_only') or use_dora (DoRA)."""
    extra = {"magnitude": "lora_magnitude_vector"} if dora else {"lora_bias": "lora_B.bias"}
    return PeftLayout("LORA", {**LORA_KEYS, **extra}, to_peft=lambda c: _lora_to_peft(c, dora),
                      from_peft=lambda d: _lora_from_peft(d, dora),
                      matches=lambda d: bool(d.get("use_dora")) == dora, fan_in_fan_out=True)
