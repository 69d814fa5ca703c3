"""Hugging Face PEFT interop: `export_peft` / `import_peft` for every method PEFT also has.

PEFT's folder: `adapter_config.json` (peft_type, target_modules, the method's fields) and
`adapter_model.safetensors` with keys `base_model.model.<path>.<tensor>`; `modules_to_save`
tensors as `base_model.model.<path>.<param>`. What differs per method — PEFT's peft_type, its
tensor names, its config fields — each method declares as its config's `peft_layout`
(core.capabilities.PeftLayout); this module knows no method by name. LoRA is peft_type "LORA"
(`lora_A.weight` (r, in), `lora_B.weight` (out, r)); DoRA the same with `use_dora: true` and
`lora_magnitude_vector`. Unlike PEFT, import checks every tensor against the model.
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
from .capabilities import PeftLayout
from .delta import get_canonical, innermost
from .durable import write_folder
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .io import adapter_state, fill_attached
from .model import adapters, attach
from .registry import METHODS, MethodConfig
from .state import wrappers_of
from .targets import is_linear, linear_dims

PREFIX = "base_model.model."


def exchangeable() -> list[str]:
    """The registered methods PEFT also has (they declare a `peft_layout`), sorted."""
    return sorted(n for n, info in METHODS.items() if info.config_cls.peft_layout is not None)


def export_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as a PEFT folder (any method PEFT has: `exchangeable()`)."""
    record = adapters(model).get(name)
    if record is None:
        raise AdapterStateError(f"unknown adapter {name!r}")
    cfg = record.config
    layout = type(cfg).peft_layout
    if layout is None:
        raise AdapterStateError(f"export_peft: {name!r} is {cfg.method!r}, which PEFT does not have (no PEFT tuner "
                                f"computes it); methods PEFT has: {', '.join(exchangeable())}")
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key, value in adapter_state(model, name).items():
        module_path, _, local = key.rpartition(".")
        if local in layout.keys:
            value = layout.to_value(innermost(get_canonical(model, module_path)), local, value.detach())
            tensors[f"{PREFIX}{module_path}.{layout.keys[local]}"] = value.cpu().contiguous()
            targets.add(module_path)
        else:  # TrainableCopy: "<path>.copy.<param>"
            mod, _, param = key.partition(".copy.")
            tensors[f"{PREFIX}{mod}.{param}"] = value.detach().cpu().contiguous()
    config = {"peft_type": layout.peft_type, "task_type": None, "target_modules": sorted(targets),
              "modules_to_save": list(cfg.modules_to_save) or None, "inference_mode": True, **layout.to_peft(cfg),
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)}
    if layout.fan_in_fan_out:
        config["fan_in_fan_out"] = any(is_linear(innermost(w)) and linear_dims(innermost(w))[2]
                                       for _, w in wrappers_of(model, [name]))

    def fill(out: Path) -> None:
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))

    return write_folder(Path(path), fill)


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


def _config_class(config: dict[str, Any]) -> type[MethodConfig]:
    """The method whose `peft_layout` reads this PEFT config."""
    peft_type = config.get("peft_type")
    for info in METHODS.values():
        layout = info.config_cls.peft_layout
        if layout is not None and layout.peft_type == peft_type and layout.matches(config):
            return info.config_cls
    known = sorted({i.config_cls.peft_layout.peft_type for i in METHODS.values() if i.config_cls.peft_layout})
    raise AdapterLoadError(f"import_peft reads PEFT types {', '.join(known)}; this one is {peft_type!r}")


def _our_tensors(layout: PeftLayout, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 saved: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """PEFT's tensors under petkit's keys: `<path>.<local>` and `<path>.copy.<param>`."""
    suffixes = sorted(layout.keys.items(), key=lambda kv: -len(kv[1]))
    ours: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if layout.skip(key, config):
            continue
        if not key.startswith(PREFIX):
            raise AdapterLoadError(f"unexpected tensor key {key!r} (expected {PREFIX}...)")
        rest = key[len(PREFIX):].replace(".default.", ".")
        hit = next(((local, rest[: -len(sfx) - 1]) for local, sfx in suffixes if rest.endswith("." + sfx)), None)
        if hit is not None:
            ours[f"{hit[1]}.{hit[0]}"] = value
            continue
        mod = next((m for m in saved if rest.startswith(m + ".") or f".{m}." in f".{rest}"), None)
        if mod is None:
            raise AdapterLoadError(f"tensor {key!r} is neither a {layout.peft_type} tensor nor a modules_to_save module")
        mod_path, _, param = rest.rpartition(".")
        ours[f"{mod_path}.copy.{param}"] = value
    return ours


def import_peft(model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = False) -> nn.Module:
    """Load a PEFT folder (any method PEFT and petkit share) into `model` as adapter `name`
    (checked, then activated)."""
    config, tensors = _read_peft(Path(path))
    cls = _config_class(config)
    layout = cls.peft_layout
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterLoadError(f"PEFT {key} (per-module ranks) is not supported yet")
    saved = tuple(config.get("modules_to_save") or ())
    ours = _our_tensors(layout, config, tensors, saved)
    targets = sorted({k.rsplit(".", 1)[0] for k in ours if ".copy." not in k})
    check_targets_exist(model, targets, path)
    for key in [k for k in ours if ".copy." not in k]:
        module_path, _, local = key.rpartition(".")
        ours[key] = layout.from_value(innermost(get_canonical(model, module_path)), local, ours[key])
    try:
        cfg = cls.from_dict({**layout.from_peft(config), "targets": targets, "modules_to_save": list(saved)})
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
