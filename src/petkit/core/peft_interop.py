"""Hugging Face PEFT interop for the LoRA family: `export_peft` / `import_peft`.

PEFT's folder: `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with keys `base_model.model.<path>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) — the same layouts petkit's LoRA uses; `modules_to_save` tensors as
`base_model.model.<path>.<param>`. DoRA is PEFT's LoRA with `use_dora: true` and one more tensor
per layer, `.lora_magnitude_vector` (out,) — petkit's "dora" `magnitude`. Unlike PEFT, import
checks every tensor against the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_check import check_targets_exist, check_values, precheck
from .adapter_schema import PEFT_SCHEMA, read_header, read_json
from .delta import innermost
from .durable import write_folder
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .io import adapter_state, fill_attached
from .model import adapters, attach
from .registry import MethodConfig, make_config
from .state import wrappers_of
from .targets import is_linear, linear_dims

PREFIX = "base_model.model."
_TO_PEFT = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias",
            "magnitude": "lora_magnitude_vector"}  # DoRA's magnitude (one entry per output row)
_FROM_PEFT = {v: k for k, v in _TO_PEFT.items()}


def peft_key(key: str) -> str:
    """A petkit delta tensor key (`pk.adapter_state`) as PEFT names it."""
    module_path, _, local = key.rpartition(".")
    if local in _TO_PEFT:
        return f"{PREFIX}{module_path}.{_TO_PEFT[local]}"
    mod, _, param = key.partition(".copy.")  # TrainableCopy (modules_to_save): "<path>.copy.<param>"
    return f"{PREFIX}{mod}.{param}"


def peft_config(cfg: MethodConfig, keys: list[str], *, conv1d: bool = False,
                base_model: str | None = None) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for LoRA-family config `cfg` whose tensors are `keys` (PEFT
    names). Refuses what PEFT cannot express."""
    if cfg.method not in ("lora", "dora"):
        raise AdapterStateError(f"export_peft supports the LoRA family; this adapter is {cfg.method!r}")
    bias = getattr(cfg, "bias", "none")
    if bias == "all":
        raise AdapterStateError("PEFT has no equivalent of bias='all' deltas; use bias='none' or 'lora_only'")
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": None, "r": cfg.r, "lora_alpha": alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}),
        "bias": "none", "lora_bias": bias == "lora_only", "fan_in_fan_out": conv1d,
        "modules_to_save": list(cfg.modules_to_save) or None, "init_lora_weights": True,
        "inference_mode": True, "use_dora": cfg.method == "dora", "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model,
    }


def peft_files(model: nn.Module, name: str = "default",
               base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter `name`'s tensors under PEFT's names and its `adapter_config.json` content."""
    record = adapters(model).get(name)
    if record is None:
        raise AdapterStateError(f"unknown adapter {name!r}")
    tensors = {peft_key(k): v.detach().cpu().contiguous() for k, v in adapter_state(model, name).items()}
    conv1d = any(is_linear(innermost(w)) and linear_dims(innermost(w))[2] for _, w in wrappers_of(model, [name]))
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
    return tensors, peft_config(record.config, list(tensors), conv1d=conv1d, base_model=base_model)


def write_peft(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write PEFT's two files into `folder`."""
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def export_peft(model: nn.Module, path: str | os.PathLike, name: str = "default",
                base_model: str | None = None) -> Path:
    """Write adapter `name` (method "lora" or "dora") as a PEFT LoRA folder.

    `base_model` goes into `base_model_name_or_path` (default: the model config's
    `_name_or_path`, often a local cache folder: give the hub id where there is one)."""
    tensors, config = peft_files(model, name, base_model)
    return write_folder(Path(path), lambda out: write_peft(out, tensors, config))


def _read_peft(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked `adapter_config.json` (size, depth, the fields petkit reads) and tensors."""
    cfg_path, tensor_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{cfg_path} is missing: not a PEFT adapter folder")
    config = read_json(cfg_path)
    PEFT_SCHEMA.check(config, str(cfg_path), "")
    if not tensor_path.is_file() or tensor_path.stat().st_size == 0:
        raise AdapterLoadError(f"{tensor_path} is missing or empty (PEFT .bin files are not read: no pickle)")
    read_header(tensor_path)
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{tensor_path} is not a readable safetensors file: {exc}") from None
    if not tensors:
        raise AdapterLoadError(f"{tensor_path} holds no tensors")
    return config, tensors


def import_peft(model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = False) -> nn.Module:
    """Load a PEFT LoRA (or DoRA: use_dora) folder into `model` as adapter `name` (checked, then activated)."""
    config, tensors = _read_peft(Path(path))
    if config.get("peft_type") != "LORA":
        raise AdapterLoadError(f"import_peft reads LoRA adapters; this one is {config.get('peft_type')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterLoadError(f"PEFT {key} (per-module ranks) is not supported yet")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError("PEFT bias='all'/'lora_only' trains base biases; petkit cannot import that exactly")
    ours: dict[str, torch.Tensor] = {}
    saved = tuple(config.get("modules_to_save") or ())
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterLoadError(f"unexpected tensor key {key!r} (expected {PREFIX}...)")
        rest = key[len(PREFIX):].replace(".default.", ".")
        head, sep, tail = rest.rpartition(".lora_")
        if sep:
            local = _FROM_PEFT.get("lora_" + tail)
            if local is None:
                raise AdapterLoadError(f"unexpected LoRA tensor {key!r}")
            ours[f"{head}.{local}"] = value
        else:
            mod = next((m for m in saved if rest.startswith(m + ".") or f".{m}." in f".{rest}"), None)
            if mod is None:
                raise AdapterLoadError(f"tensor {key!r} is neither LoRA nor a modules_to_save module")
            mod_path, _, param = rest.rpartition(".")
            ours[f"{mod_path}.copy.{param}"] = value
    targets = sorted({k.rsplit(".", 1)[0] for k in ours if k.rsplit(".", 1)[1].startswith("lora_")})
    fields = {"r": int(config["r"]), "alpha": float(config["lora_alpha"]),
              "dropout": float(config.get("lora_dropout", 0.0)), "rslora": bool(config.get("use_rslora", False)),
              "targets": targets, "modules_to_save": list(saved)}
    if config.get("use_dora") and config.get("lora_bias"):
        raise AdapterLoadError("PEFT DoRA with lora_bias has no petkit equivalent")
    try:
        cfg = (make_config("dora", **fields) if config.get("use_dora") else
               make_config("lora", bias="lora_only" if config.get("lora_bias") else "none", **fields))
    except ConfigError as exc:
        raise AdapterLoadError(f"{path}: adapter_config.json: {exc}") from None
    touched = targets + sorted({k.split(".copy.", 1)[0] for k in ours if ".copy." in k})
    check_targets_exist(model, touched, path)
    check_values(ours, path, strict=True)
    precheck(model, cfg, name, touched, ours, path)
    try:
        attach(model, cfg, name)
    except Exception as exc:
        raise AdapterLoadError(f"{path} does not fit this model: {exc}") from None
    fill_attached(model, name, ours, trainable)
    return model
