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

from .adapter_check import check_targets_exist, check_values, compare_shapes, precheck
from .adapter_schema import PEFT_SCHEMA, read_json
from .capabilities import PeftLayout
from .safetensors_header import read_header
from .delta import canonical_modules, get_canonical, innermost
from .durable import write_folder
from .errors import AdapterLoadError, AdapterStateError, ConfigError, PetkitError
from .io import adapter_state, fill_attached
from .model import adapters, attach
from .registry import METHODS, MethodConfig
from .state import wrappers_of
from .targets import is_linear, linear_dims

PREFIX = "base_model.model."


def exchangeable() -> list[str]:
    """The registered methods PEFT also has (they declare a `peft_layout`), sorted."""
    return sorted(n for n, info in METHODS.items() if info.config_cls.peft_layout is not None)


def _layout(cfg: MethodConfig, what: str) -> PeftLayout:
    """The method's declared PEFT layout; refused for a method PEFT does not have."""
    layout = type(cfg).peft_layout
    if layout is None:
        raise AdapterStateError(f"{what}: this adapter is {cfg.method!r}, which PEFT does not have (no PEFT "
                                f"tuner computes it); methods PEFT has: {', '.join(exchangeable())}")
    return layout


def peft_key(key: str, layout: PeftLayout) -> str:
    """A petkit delta tensor key (`pk.adapter_state`) as PEFT names it."""
    module_path, _, local = key.rpartition(".")
    if local in layout.keys:
        return f"{PREFIX}{module_path}.{layout.keys[local]}"
    mod, _, param = key.partition(".copy.")  # TrainableCopy (modules_to_save): "<path>.copy.<param>"
    return f"{PREFIX}{mod}.{param}"


def peft_config(cfg: MethodConfig, keys: list[str], *, conv1d: bool = False,
                base_model: str | None = None) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for config `cfg` whose tensors are `keys` (PEFT names);
    refuses what PEFT cannot express."""
    layout = _layout(cfg, "export_peft")
    names = tuple(f".{n}" for n in layout.keys.values())
    targets = sorted({k[len(PREFIX):-len(n)] for k in keys for n in names if k.endswith(n)})
    config = {"peft_type": layout.peft_type, "task_type": None, "target_modules": layout.target_names(targets),
              **_modules_to_save(cfg, layout), "inference_mode": True,
              **layout.to_peft(cfg), "base_model_name_or_path": base_model}
    alpha = config.get("lora_alpha")
    if isinstance(alpha, float) and alpha.is_integer():
        config["lora_alpha"] = int(alpha)  # as PEFT writes it (vLLM reads it as given)
    if layout.fan_in_fan_out:
        config["fan_in_fan_out"] = conv1d
    return config


def _modules_to_save(cfg: MethodConfig, layout: PeftLayout) -> dict[str, Any]:
    """PEFT's `modules_to_save` entry; none where PEFT's config has no such field (PEFT warns
    about an unknown key), and then an adapter with full copies is refused."""
    if layout.modules_to_save:
        return {"modules_to_save": list(cfg.modules_to_save) or None}
    if cfg.modules_to_save:
        raise AdapterStateError(f"export_peft: PEFT's {layout.peft_type} adapters cannot hold full module copies "
                                f"(modules_to_save={list(cfg.modules_to_save)} has no place in its config)")
    return {}


def peft_files(model: nn.Module, name: str = "default",
               base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter `name`'s tensors under PEFT's names and its `adapter_config.json` content."""
    record = adapters(model).get(name)
    if record is None:
        raise AdapterStateError(f"unknown adapter {name!r}")
    layout = _layout(record.config, "export_peft")
    state, params = layout.params_to_peft(model, name, layout.to_state(adapter_state(model, name)))
    tensors = {peft_key(k, layout): _peft_value(model, layout, k, v.detach()).cpu().contiguous()
               for k, v in state.items()}
    conv1d = any(is_linear(innermost(w)) and linear_dims(innermost(w))[2] for _, w in wrappers_of(model, [name]))
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
    config = peft_config(record.config, list(tensors), conv1d=conv1d, base_model=base_model)
    config.update(layout.fields_to_peft(model, name))
    tensors.update({k: v.detach().cpu().contiguous() for k, v in params.items()})
    return tensors, config


def _peft_value(model: nn.Module, layout: PeftLayout, key: str, value: torch.Tensor) -> torch.Tensor:
    """The tensor as PEFT holds it (the layout's `to_value`; TrainableCopy tensors as they are)."""
    module_path, _, local = key.rpartition(".")
    if local not in layout.keys:
        return value
    return layout.to_value(innermost(get_canonical(model, module_path)), local, value)


def write_peft(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write PEFT's two files into `folder`."""
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def export_peft(model: nn.Module, path: str | os.PathLike, name: str = "default",
                base_model: str | None = None) -> Path:
    """Write adapter `name` as a PEFT folder (any method PEFT has: `exchangeable()`).

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
        # PEFT's rule: a module whose path ends with the name (so "gate" also saves "shared_expert_gate")
        mod = next((m for m in saved if rest.startswith(m + ".") or f"{m}." in rest), None)
        if mod is None:
            raise AdapterLoadError(f"tensor {key!r} is neither a {layout.peft_type} tensor nor a modules_to_save module")
        mod_path, _, param = rest.rpartition(".")
        ours[f"{mod_path}.copy.{param}"] = value
    return ours


def _modules_of(model: nn.Module, keys: list[str]) -> list[str]:
    """The module paths petkit tensor keys belong to (each key's longest prefix that is a module)."""
    paths, found = {p for p, _, _ in canonical_modules(model)}, set()
    for key in keys:
        parts = key.split(".")
        found.add(next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in paths), ""))
    return sorted(found)


def _saved_modules(saved: tuple[str, ...], ours: dict[str, torch.Tensor]) -> list[str]:
    """The config's modules_to_save: PEFT's names, or the copied modules' paths where PEFT's
    looser matching (path ends with the name) took a module petkit's (`.name` suffix) would not."""
    copies = sorted({k.split(".copy.", 1)[0] for k in ours if ".copy." in k})
    if all(any(p == m or p.endswith("." + m) for m in saved) for p in copies):
        return list(saved)
    return copies


def _params_from_peft(layout: PeftLayout, model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      path: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The layout's `params_from_peft` (parameter targets); a PetkitError says which folder."""
    try:
        return layout.params_from_peft(model, config, tensors)
    except PetkitError as exc:
        raise AdapterLoadError(f"{path}: {exc}") from None


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
    tensors, params = _params_from_peft(layout, model, config, tensors, path)
    ours = _our_tensors(layout, config, tensors, saved)
    targets = sorted({k.rsplit(".", 1)[0] for k in ours if ".copy." not in k})
    check_targets_exist(model, targets, path)
    for key in [k for k in ours if ".copy." not in k]:
        module_path, _, local = key.rpartition(".")
        ours[key] = layout.from_value(innermost(get_canonical(model, module_path)), local, ours[key])
    try:
        cfg = cls.from_dict({**layout.from_peft(config), "targets": targets,
                             "modules_to_save": _saved_modules(saved, ours), **layout.fields_from_peft(config, targets)})
    except ConfigError as exc:
        raise AdapterLoadError(f"{path}: adapter_config.json: {exc}") from None
    ours.update(params)
    touched = targets + _modules_of(model, list(params)) + sorted(
        {k.split(".copy.", 1)[0] for k in ours if ".copy." in k})
    check_targets_exist(model, touched, path)
    check_values(ours, path, strict=True)
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    expected = precheck(model, cfg, name, touched, shapes, path)
    if expected is not None:
        try:
            compare_shapes(expected, shapes)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"{path}: {exc}") from None
    try:
        attach(model, cfg, name)
    except Exception as exc:
        raise AdapterLoadError(f"{path} does not fit this model: {exc}") from None
    fill_attached(model, name, ours, trainable)
    return model
