"""Tiny randomly initialised transformers models for tests: no downloads, built from configs."""

from __future__ import annotations

import torch

from petkit.core.errors import ConfigError
from petkit.models.loading import (NEW_MODULES_ATTR, KNOWN_HEAD_NAMES, _auto_class,
                                   quiet_optional_imports)

TINY_VOCAB = 128


def _tiny_config(arch: str, task: str, num_labels: int) -> object:
    """A 2-layer, 32-wide config with dropout off, so forward passes are deterministic."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "num_labels": num_labels}
    if arch == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common,
        )
    if arch == "bert":
        return BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, is_decoder=task == "causal-lm", **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **common,
        )
    if arch in MOE:  # experts as 3-D parameters (transformers v5): 4 experts, 2 per token
        return _moe_config(arch, common)
    raise ConfigError(f"tiny_model arch must be one of {', '.join(ARCHS)}, got {arch!r}")


MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHS = ("llama", "bert", "gpt2", *MOE)


def _moe_config(arch: str, common: dict) -> object:
    """A 2-layer, 32-wide mixture-of-experts config of `arch` (every layer sparse)."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    shared = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "num_experts_per_tok": 2, **common}
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=48, num_local_experts=4, **shared)
    cls = Qwen2MoeConfig if arch == "qwen2_moe" else Qwen3MoeConfig
    extra = {"shared_expert_intermediate_size": 40} if arch == "qwen2_moe" else {}
    return cls(intermediate_size=48, moe_intermediate_size=24, num_experts=4, decoder_sparse_step=1,
               **extra, **shared)


def tiny_model(
    arch: str, task: str = "causal-lm", num_labels: int = 2, seed: int = 0
) -> tuple[torch.nn.Module, None]:
    """A seeded random tiny model of `arch` for `task`; returns (model, None) (no tokenizer)."""
    with quiet_optional_imports():  # transformers' first model import pulls in torchao
        auto = _auto_class(task)
        config = _tiny_config(arch, task, num_labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(config)
    children = dict(model.named_children())
    heads = [n for n in KNOWN_HEAD_NAMES if n in children] if task == "seq-cls" else []
    setattr(model, NEW_MODULES_ATTR, heads)
    model.eval()
    return model, None
