"""Toy models and inputs shared by the contract table and method tests."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from petkit.models import tiny_model
from petkit.models.vision import tiny_vision_model


class MLP(nn.Module):
    """A plain nn.Module with no transformers in it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


class One(nn.Module):
    """A single Linear(6 -> 5) named `proj`: the smallest model for closed-form checks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def llama(seed: int = 0) -> nn.Module:
    return tiny_model("llama", seed=seed)[0].eval()


def gpt2(seed: int = 0) -> nn.Module:
    return tiny_model("gpt2", seed=seed)[0].eval()


def mixtral(seed: int = 0) -> nn.Module:
    """A 2-layer, 32-wide Mixtral: 4 experts as 3-D parameters, 2 per token."""
    return tiny_model("mixtral", seed=seed)[0].eval()


def qwen2_moe(seed: int = 0) -> nn.Module:
    return tiny_model("qwen2_moe", seed=seed)[0].eval()


def bert_cls(seed: int = 0) -> nn.Module:
    return tiny_model("bert", task="seq-cls", num_labels=3, seed=seed)[0].eval()


def vit(seed: int = 0) -> nn.Module:
    """A 2-block, 32-wide DINOv2 classifier on 16x16 images (patch 4: 16 patches), 3 classes."""
    return tiny_vision_model(num_labels=3, seed=seed)


def save_tiny_bert(folder: Path) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a model folder (for
    commands that take --model FOLDER)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from petkit.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def save_tiny_llama(folder: Path) -> str:
    """A 2-layer, 32-wide random Llama (4 heads in 2 KV groups) with SmolLM2's tokenizer, saved
    as a model folder (for commands that take --model FOLDER)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from petkit.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


TOYS: dict[str, Callable[[int], nn.Module]] = {"mlp": mlp, "llama": llama, "gpt2": gpt2, "bert": bert_cls,
                                               "vit": vit, "mixtral": mixtral, "qwen2_moe": qwen2_moe}


def inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(4, 8, generator=g)}
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 60, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def run(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def perturb(params: dict[str, nn.Parameter], seed: int = 0, scale: float = 0.1) -> None:
    """Give every delta parameter a seeded non-trivial value (deltas start at identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
