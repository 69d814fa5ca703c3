"""PEFT's prompt-learning folders for petkit's input extensions (prompt and prefix tuning).

PEFT keeps the whole delta as one tensor `prompt_embeddings` (no module path: it lives in its
`PeftModelForCausalLM`), and the model's shape in the config (`token_dim`, `num_layers`,
`num_attention_heads`, `num_transformer_submodules`); its task decides how the prompt enters, so
only causal language models (task "CAUSAL_LM") are exchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from petkit.core.delta import DeltaModule, iter_deltas
from petkit.core.errors import AdapterLoadError, AdapterStateError, ConfigError

from .virtual_tokens import input_embedding_path

PEFT_KEY = "prompt_embeddings"


def extension(model: nn.Module, name: str, cls: type[DeltaModule]) -> tuple[str, Any]:
    """(path, wrapper) of adapter `name`'s input extension."""
    return next((p, w) for p, w in iter_deltas(model) if w.adapter_name == name and isinstance(w, cls))


def causal_lm(model: nn.Module) -> None:
    """Refuse a model PEFT would not take as task CAUSAL_LM."""
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise AdapterStateError(f"PEFT's prompt learning is exchanged for causal language models (task CAUSAL_LM); "
                                f"this is a {type(model).__name__}")


def task_fields(model: nn.Module, token_dim: int, heads: int) -> dict[str, Any]:
    """The model-shape fields of PEFT's prompt-learning config."""
    causal_lm(model)
    return {"task_type": "CAUSAL_LM", "token_dim": token_dim, "num_attention_heads": heads,
            "num_layers": model.config.num_hidden_layers, "num_transformer_submodules": 1}


def to_peft(model: nn.Module, name: str, state: dict[str, Any], cls: type[DeltaModule],
            value: Callable[[Any], torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """PeftLayout.params_to_peft: the extension's tensors replaced by PEFT's `prompt_embeddings`."""
    path, wrapper = extension(model, name, cls)
    rest = {k: v for k, v in state.items() if not k.startswith(path + ".")}
    return rest, {PEFT_KEY: value(wrapper).detach().clone()}


def from_peft(model: nn.Module, peft_config: dict[str, Any], tensors: dict[str, Any], local: str,
              convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> tuple[dict[str, Any], dict[str, Any]]:
    """PeftLayout.params_from_peft: `prompt_embeddings` as the extension's tensor `local`."""
    if peft_config.get("task_type") != "CAUSAL_LM":
        raise ConfigError(f"PEFT task_type {peft_config.get('task_type')!r}: petkit reads prompt learning of "
                          "causal language models (CAUSAL_LM)")
    if int(peft_config.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("PEFT num_transformer_submodules > 1 (encoder-decoder prompts) is not supported")
    rest = dict(tensors)
    value = rest.pop(PEFT_KEY, None)
    if value is None:
        raise AdapterLoadError(f"the file has no {PEFT_KEY!r} tensor")
    return rest, {f"{input_embedding_path(model)}.{local}": convert(value)}
