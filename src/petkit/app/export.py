"""`petkit merge` and `petkit export`: an adapter as a folder other tools load.

- merge: the base with the adapter merged into its weights, a plain Hugging Face folder;
- export --format peft: a PEFT LoRA adapter (`base_model_name_or_path`: the base's hub id);
- export --format vllm: the same, checked against vLLM's LoRA loader rules (`core.vllm_format`);
  what vLLM cannot serve is refused, naming why, and merging is the way out.

Each writes a NEW folder atomically (`core.durable.write_folder`: built in a temp sibling, renamed
in): a folder holding files is refused before any model loads unless `overwrite`, and then the
old one is replaced only once the new one is complete. Only what the model, its tokenizer and
the exporter write goes in, plus a README.md model card (`app.model_card`) saying how to use it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from petkit.app.adapter_base import adapter_meta, task_info
from petkit.app.model_card import Card, render
from petkit.app.pipeline import Prepared, load_with_adapter, needs_data, sample_batch
from petkit.app.recipe import Recipe
from petkit.core.safetensors_header import read_header
from petkit.core.durable import write_folder
from petkit.core.errors import ConfigError, PetkitError
from petkit.core.io import TENSORS, config_of
from petkit.core.model import unload
from petkit.core.state import active_adapters
from petkit.core.peft_interop import exchangeable, peft_config, peft_files, peft_key, write_peft
from petkit.core.registry import get_method
from petkit.core.vllm_format import max_lora_rank, vllm_problems
from petkit.models.embedded import public_name
from petkit.models.quant_merge import merge_for_saving

FORMATS = ("peft", "vllm")
Echo = Callable[[str], None]


def claim_folder(output: str | Path, overwrite: bool) -> Path:
    """`output` as a folder to write: refused when it is a file, or a folder holding files and
    not `overwrite` (checked before anything loads)."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; name a folder to create")
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(f"--output {folder} already holds files ({shown}); choose a new folder, "
                          "or pass --overwrite to replace it once the new one is complete")
    return folder


def _card(recipe: Recipe, adapter: str | Path, kind: str, prep: Prepared | None = None,
          rank: int | None = None) -> Card:
    meta = adapter_meta(adapter)
    kind_of_task = prep.task_type if prep else recipe.data.task_type
    try:
        task = task_info(recipe, adapter, kind_of_task)
    except PetkitError:  # an older adapter whose task cannot be read: the card says less
        task = {"type": kind_of_task}
    chat = bool(getattr(getattr(prep, "tokenizer", None), "chat_template", None))
    image = prep is not None and prep.tokenizer is None
    return Card(kind, public_name(recipe.model.name), meta["method"], dict(meta["config"]), task,
                chat, rank, image)


def _name_labels(model: nn.Module, labels: list[str] | None) -> None:
    """A head model's config names its outputs with the run's labels, not LABEL_0, LABEL_1."""
    config = getattr(model, "config", None)
    if config is None or not labels or len(labels) != getattr(config, "num_labels", 0):
        return
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


def merge_to_folder(recipe: Recipe, adapter: str | Path, output: str | Path,
                    requantize: bool = False, overwrite: bool = False,
                    echo: Echo | None = None) -> Path:
    """Merge the adapter into the base; write a plain Hugging Face model folder and its card.

    Over a quantised base (model.quantize): into the dequantised base (exact), or with
    `requantize` into the 4/8-bit weights, saved so that `from_pretrained` reloads them as they are.
    """
    if requantize and not recipe.model.quantize:
        raise ConfigError("--requantize needs an adapter trained on a quantised base (model.quantize)")
    folder = claim_folder(output, overwrite)
    prep = load_with_adapter(recipe, adapter, with_data=needs_data(recipe) or requantize)
    if recipe.model.quantize:
        base, note = merge_for_saving(prep.model, requantize, sample_batch(prep) if requantize else None)
        (echo or print)(note)
    else:
        base = unload(prep.model, merge=True)
    card = _card(recipe, adapter, "merged", prep)
    if card.task.get("type") == "head":
        _name_labels(base, card.task.get("labels"))

    def fill(tmp: Path) -> None:
        base.save_pretrained(tmp)
        if prep.tokenizer is not None:  # a ViT has none: its pixels come from data.images
            prep.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(render(card, str(folder.resolve())), encoding="utf-8")

    return write_folder(folder, fill)


OFFSET_PREFIX = "init_"  # LoRA's frozen starting factors (init_A, init_B)


def _is_offset(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(OFFSET_PREFIX)


def exported_rank(adapter: str | Path) -> int:
    """The rank of the exported LoRA: r, or 2r when a frozen starting offset is folded in
    (PEFT's own conversion of PiSSA/OLoRA adapters)."""
    r = int(adapter_meta(adapter)["config"]["r"])
    names = read_header(Path(adapter) / TENSORS).tensors
    return 2 * r if any(_is_offset(k) for k in names) else r


def vllm_refusal(adapter: str | Path) -> str | None:
    """Why vLLM cannot serve `adapter` (None when it can), from its files alone."""
    meta = adapter_meta(adapter)
    if meta["method"] not in ("lora", "dora"):
        return f"it is a {meta['method']} adapter and vLLM serves LoRA adapters only"
    cfg = config_of(meta, adapter)
    # a frozen starting offset (PiSSA-style inits) is folded into the exported A/B: not a key
    keys = [peft_key(k, type(cfg).peft_layout) for k in read_header(Path(adapter) / TENSORS).tensors
            if not _is_offset(k)]
    try:
        config = peft_config(cfg, keys)
    except PetkitError as exc:
        return str(exc)
    problems = vllm_problems(config, keys)
    return "; ".join(problems) if problems else None


def _check_format(adapter: str | Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    method = adapter_meta(adapter)["method"]
    if fmt == "peft" and get_method(method).config_cls.peft_layout is None:
        raise ConfigError(f"{adapter} is a {method} adapter, which PEFT does not have (PEFT's "
                          f"format holds {', '.join(exchangeable())}): use petkit merge to get a "
                          "plain model instead")
    why = vllm_refusal(adapter) if fmt == "vllm" else None
    if why:
        raise ConfigError(f"vLLM cannot serve {adapter}: {why} (its rules: docs/export.md); merge "
                          f"it instead (petkit merge --adapter {adapter} --output DIR) and serve "
                          "the merged folder as a plain model")


def export_adapter(recipe: Recipe, adapter: str | Path, output: str | Path, fmt: str = "peft",
                   overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Write `adapter` as a PEFT (or vLLM-ready PEFT) folder with its model card; returns the
    folder and what the card says (base, kind, max_lora_rank for vllm)."""
    _check_format(adapter, fmt)
    folder = claim_folder(output, overwrite)
    prep = load_with_adapter(recipe, adapter, with_data=needs_data(recipe))
    base = public_name(recipe.model.name)
    rank = max_lora_rank(exported_rank(adapter)) if fmt == "vllm" else None
    card = _card(recipe, adapter, fmt, prep, rank)
    tensors, config = peft_files(prep.model, active_adapters(prep.model)[0], base)
    readme = render(card, str(folder.resolve()))

    def fill(tmp: Path) -> None:
        write_peft(tmp, tensors, config)
        (tmp / "README.md").write_text(readme, encoding="utf-8")

    write_folder(folder, fill)
    return folder, dataclasses.asdict(card)
