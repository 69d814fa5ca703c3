"""Porting a patch to an evolved base without training (PORTLLM), and making an evolved base.

PORTLLM (Khan et al., 2024) treats a fine-tuned patch as a weight difference
``dW = W_old' - W_old`` and applies it to the newer base: ``W_new' = W_new + dW``. For petkit:

- a LoRA-family delta *is* ``dW`` (``B A * scaling``), so its tensors are carried unchanged;
- a trainable full copy (a task head, `modules_to_save`) stores ``W_old'``, so it becomes
  ``W_new + (W_old' - W_old)``;
- other methods' tensors are carried unchanged too (for a multiplicative method such as IA3 that
  re-applies the learned scale to the new weights, which is the same rule in its own space).

`port_adapter` checks that the adapter was trained on `old_base` (its fingerprint must match) and
that `new_base` has the same modules and shapes, attaches it to `new_base`, and — given `output` —
saves it with a ``ported_from`` record (the old base's fingerprint, the source folder and its
tensor checksum) in ``adapter.json``; the file's own fingerprint is the new base's, so it loads
there with the ordinary strict check.

`evolve_base` makes an evolved base: full fine-tuning (petkit's `pk.train` over every parameter)
of a causal LM on a text corpus, saved as a plain Hugging Face folder.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petkit.core.delta import iter_deltas
from petkit.core.durable import write_folder
from petkit.core.errors import AdapterLoadError, ConfigError
from petkit.core.fingerprint import compare, fingerprint
from petkit.core.io import META, TENSORS, config_of, fill_attached, read_adapter, save_adapter
from petkit.core.model import TrainableCopy, attach
from petkit.core.state import adapters
from petkit.training import TrainConfig, TrainResult, train

RULE = "portllm: W_new + (W_old' - W_old); low-rank and method deltas carried unchanged"


def _copy_rebase(new_base: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                 old_base: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable full copies re-based: W_new + (W_old' - W_old); other tensors unchanged."""
    out = dict(tensors)
    old_params = dict(old_base.named_parameters())
    for path, wrapper in iter_deltas(new_base):
        if wrapper.adapter_name != name or not isinstance(wrapper, TrainableCopy):
            continue
        for local, new_param in wrapper.base.named_parameters():
            key = f"{path}.copy.{local}"
            old_key = _base_param_key(old_params, path, local)
            if key in out and old_key is not None:
                out[key] = new_param.detach().cpu() + (out[key] - old_params[old_key].detach().cpu())
    return out


def _base_param_key(params: dict[str, nn.Parameter], path: str, local: str) -> str | None:
    """The old base's parameter for `<path>.<local>` (a wrapped base may nest as `.base.`)."""
    for key in (f"{path}.{local}", f"{path}.base.{local}"):
        if key in params:
            return key
    return None


def _check_bases(meta: dict[str, Any], old_base: nn.Module, new_base: nn.Module,
                 source: Any) -> dict[str, Any]:
    """The adapter must fit `old_base` exactly and `new_base`'s shapes; returns old's print."""
    targets = list(meta["targets"])
    old_print = fingerprint(old_base, targets)
    problems = compare(meta["base_fingerprint"], old_print)
    if problems:
        raise AdapterLoadError(f"{source} was not trained on old_base: {'; '.join(problems[:2])}")
    try:
        new_print = fingerprint(new_base, targets)
    except (AttributeError, KeyError) as exc:
        raise AdapterLoadError(f"{source}: new_base lacks a module the adapter touches ({exc})") \
            from None
    shape_problems = [p for p in compare(old_print, new_print) if "weights differ" not in p]
    if shape_problems:
        raise AdapterLoadError(f"{source} cannot be ported: new_base has another shape: "
                               f"{shape_problems[0]}")
    return old_print


def port_adapter(adapter: str | os.PathLike, old_base: nn.Module, new_base: nn.Module, *,
                 name: str | None = None, output: str | os.PathLike | None = None) -> nn.Module:
    """Attach the adapter folder `adapter` (trained on `old_base`) to `new_base` training-free by
    PORTLLM's rule (module docstring) and activate it; with `output`, save the ported adapter
    there with a ``ported_from`` record. Returns `new_base`."""
    meta, tensors = read_adapter(adapter)
    config = config_of(meta, adapter)
    name = name or meta.get("name") or "default"
    if name in adapters(new_base):
        raise ConfigError(f"new_base already has an adapter named {name!r}; pass name=...")
    old_print = _check_bases(meta, old_base, new_base, adapter)
    attach(new_base, config, name)
    fill_attached(new_base, name, _copy_rebase(new_base, name, tensors, old_base), trainable=False)
    record = {"source": os.path.abspath(adapter), "base_fingerprint": old_print,
              "tensors_sha256": meta["tensors_sha256"], "rule": RULE,
              "ported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    new_base.__dict__.setdefault("_petkit_ported_from", {})[name] = record
    if output is not None:
        save_ported(new_base, output, name)
    return new_base


def ported_from(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``ported_from`` record of an adapter folder (None for an adapter trained in place)."""
    meta, _ = read_adapter(path)
    record = meta.get("ported_from")
    return record if isinstance(record, dict) else None


def save_ported(model: nn.Module, path: str | os.PathLike, name: str) -> Path:
    """`pk.save_adapter`, plus the ``ported_from`` record `port_adapter` kept for `name`."""
    record = model.__dict__.get("_petkit_ported_from", {}).get(name)
    saved = save_adapter(model, path, name=name)
    if record is None:
        return saved
    meta = json.loads((saved / META).read_text())
    meta["ported_from"] = record
    tensors = (saved / TENSORS).read_bytes()

    def fill(tmp: Path) -> None:
        (tmp / TENSORS).write_bytes(tensors)
        (tmp / META).write_text(json.dumps(meta, indent=2))

    return write_folder(saved, fill)


def text_examples(texts: Sequence[str], tokenizer: Any, length: int) -> list[dict]:
    """Causal-LM examples: the texts joined by EOS and cut into rows of `length` tokens."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    rows = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
    if not rows:
        raise ConfigError(f"the corpus holds {len(stream)} tokens: fewer than one row of {length}")
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": list(r)} for r in rows]


def evolve_base(model: nn.Module, tokenizer: Any, texts: Sequence[str], output: str | os.PathLike,
                config: TrainConfig, *, length: int = 128) -> TrainResult:
    """Continued pre-training of every parameter of causal LM `model` on `texts` (petkit's
    `pk.train` with `parameters=` all of them), saved with its tokenizer as a plain Hugging Face
    folder at `output`. The model must carry no adapters."""
    if adapters(model):
        raise ConfigError(f"evolve_base trains the base itself; detach adapters "
                          f"{list(adapters(model))} first")
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    result = train(model, text_examples(texts, tokenizer, length), config,
                   pad_id=int(tokenizer.pad_token_id or 0), parameters=params)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_folder(Path(output), fill)
    return result
