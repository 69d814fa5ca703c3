"""Adapter files: `adapter.safetensors` (delta tensors keyed by canonical module path) and
`adapter.json` (method, config, targets, versions, base fingerprint, tensor checksum, and where
`describe_base` said so: the base's name and the task the adapter was trained for).

Saving is atomic and versioned (`durable.write_folder`: a new `.<name>.v<N>` folder, fsynced,
then the `<name>` symlink swapped onto it): a reader or a crash never sees half an adapter, and
a reader never finds the folder missing while another process overwrites it. Loading checks
what the files *declare* before reading any tensor data: `adapter.json` against its schema
(`adapter_schema`), the safetensors header's layout against the file's size
(`safetensors_header`), the recorded targets (exact module paths; a regex from a file is never
run), the config's sizes and the shapes it implies on this base (`adapter_check`, on a meta
skeleton) against the header's names, shapes and dtypes. Only then the checksum pass, the
tensors and their values. A load that fails later undoes its attach, so a failed load leaves
the model as it was. Nothing is pickled.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .disk import file_sha256
from .adapter_check import check_targets_exist, check_values, compare_shapes, exact_targets, precheck
from .adapter_schema import FORMAT_VERSION, check_meta, read_json
from .delta import iter_deltas
from .durable import read_version, write_folder
from .errors import AdapterLoadError, AdapterStateError, ConfigError
from .fingerprint import compare, fingerprint
from .model import activate, attach, detach, set_trainable
from .capabilities import DataInitialized
from .state import adapters, check_known, wrappers_of
from .registry import METHODS, MethodConfig, config_from_json
from .safetensors_header import Header, check_budget, check_declared, read_header
from .version import __version__

TENSORS, META = "adapter.safetensors", "adapter.json"
# Bound on the numbers of an adapter whose exact shapes cannot be computed before reading it:
# this many times the parameters it could be sized from, plus a little (~4 MB of float32).
BUDGET_FACTOR, BUDGET_SLACK = 4, 1 << 20


BASE_ATTR = "_petkit_base"  # on a model: what `describe_base` recorded for adapter.json


def describe_base(model: nn.Module, base_model: str | None = None,
                  task: Mapping[str, Any] | None = None) -> nn.Module:
    """Record on `model` what `save_adapter` writes beside its adapters: `base_model` (an
    embedded name, a hub id or a folder) and `task` (type: verbaliser | head | instruction, and
    labels, label_words, template, input_column where they apply), so that an adapter copied out
    of its run folder still says which base it needs and how it is used."""
    record = dict(getattr(model, BASE_ATTR, None) or {})
    if base_model is not None:
        record["base_model"] = str(base_model)
    if task is not None:
        record["task"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in task.items()
                          if v is not None}
    model.__dict__[BASE_ATTR] = record
    return model


def base_record(model: nn.Module) -> dict[str, Any]:
    """What `describe_base` recorded on `model` ({} when nothing)."""
    return dict(getattr(model, BASE_ATTR, None) or {})


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s delta tensors keyed `<canonical module path>.<local name>`."""
    if name not in adapters(model):
        raise AdapterStateError(f"unknown adapter {name!r}; attached: {list(adapters(model)) or 'none'}")
    state = {}
    for path, w in iter_deltas(model):
        if w.adapter_name == name:
            for local, p in w.delta_parameters().items():
                state[f"{path}.{local}" if path else local] = p
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to folder `path` atomically (replacing any adapter there); returns it.

    Concurrent saves into one parent folder take turns; a reader always finds a complete adapter.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model, name).items()}
    if not state:
        raise AdapterStateError(f"adapter {name!r} has no tensors to save")
    record = adapters(model)[name]

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / TENSORS), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "library": "petkit",
            "library_version": __version__,
            "name": name,
            "method": record.config.method,
            "config": record.config.to_dict(),
            "targets": record.targets,
            "base_fingerprint": record.fingerprint,
            "tensors_sha256": file_sha256(tmp / TENSORS),
            "num_parameters": int(sum(v.numel() for v in state.values())),
            **base_record(model),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))

    need = sum(v.numel() * v.element_size() for v in state.values()) + (64 << 10)
    return write_folder(Path(path), fill, versioned=True, need_bytes=need)


def _complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / TENSORS).is_file()


def _declared(folder: Path, asked: object) -> tuple[dict[str, Any], Header]:
    """`adapter.json` (schema-checked) and the tensor file's header (layout checked against the
    file's size): everything an adapter declares, with no tensor data read."""
    if not folder.is_dir():
        raise AdapterLoadError(f"adapter folder {asked} does not exist")
    meta_path, tensor_path = folder / META, folder / TENSORS
    if not meta_path.is_file():
        raise AdapterLoadError(f"{meta_path} is missing: not a petkit adapter folder")
    meta = check_meta(read_json(meta_path), str(meta_path))
    if not tensor_path.is_file() or tensor_path.stat().st_size == 0:
        raise AdapterLoadError(f"{tensor_path} is missing or empty")
    shown = Path(asked) / TENSORS  # the user's path, not the version folder it links to
    header = read_header(tensor_path, shown=shown)
    if not header.tensors:
        raise AdapterLoadError(f"{shown} holds no tensors")
    return meta, header


def _tensors(header: Header, meta: dict[str, Any], asked: object) -> dict[str, torch.Tensor]:
    """The tensors, read after the declared names, shapes and sizes passed: checksum first."""
    path, shown = header.path, Path(asked) / TENSORS
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise AdapterLoadError(f"{shown} cannot be read: {exc}") from None
    if digest != meta["tensors_sha256"]:
        raise AdapterLoadError(f"{shown} does not match the checksum in {META}: truncated or corrupted")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise AdapterLoadError(f"{shown} is not a readable safetensors file: {exc}") from None


def _fingerprint_budget(meta: dict[str, Any]) -> int:
    """Numbers an adapter of these targets may hold when its exact shapes are unknown: a
    multiple of the touched modules' own parameters (delta families stay well below it)."""
    touched = sum(math.prod(s) for shapes in meta["base_fingerprint"]["shapes"].values() for s in shapes)
    return BUDGET_FACTOR * touched + BUDGET_SLACK


def read_adapter(path: str | os.PathLike, expected: Mapping[str, tuple[int, ...]] | None = None,
                 check: Callable[[dict[str, Any]], None] | None = None,
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter folder without touching any model: schema, `check(meta)`, the
    tensor file's declared layout, its names and shapes (against `expected` {key: shape} when
    given, else its size against the recorded targets'), checksum, tensors. Reads one version
    whole even while another process overwrites the folder."""
    def read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta, header = _declared(folder, path)
        if check is not None:
            check(meta)
        if expected is not None:
            check_declared(header, expected, path, float_only=False)
        else:
            check_budget(header, _fingerprint_budget(meta), path, "the modules it targets")
        return meta, _tensors(header, meta, path)

    return read_version(Path(path), read, _complete)


def config_of(meta: dict[str, Any], where: object) -> MethodConfig:
    """The method config recorded in (schema-checked) `meta`; AdapterLoadError naming the field."""
    try:
        return config_from_json({**meta["config"], "method": meta["method"]})
    except ConfigError as exc:
        field = "method" if meta["method"] not in METHODS else "config"
        raise AdapterLoadError(f"{where}: field {field!r}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise AdapterLoadError(f"{where}: field 'config' does not build a "
                               f"{meta['method']} config: {exc}") from None


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    strict: bool = True,
    trainable: bool = False,
) -> nn.Module:
    """Load an adapter folder into `model` as `name` (default: its saved name) and activate it.

    strict=False turns a base-fingerprint mismatch into a warning; shapes and keys are always checked.
    """
    def read(folder: Path) -> tuple[MethodConfig, str, dict[str, torch.Tensor]]:
        meta, header = _declared(folder, path)
        config = config_of(meta, path)
        adapter = name or meta.get("name") or "default"
        if adapter in adapters(model):
            raise AdapterStateError(f"an adapter named {adapter!r} is already attached; pass "
                                    "name=... to load under another")
        _check_base(model, meta, path, strict)
        config = exact_targets(model, config, meta["targets"], path)
        expected = precheck(model, config, adapter, meta["targets"], header.shapes, path)
        if expected is not None:
            check_declared(header, expected, path, float_only=strict)
        else:  # a method that cannot be sized on the meta device: bound by the model's size
            check_budget(header, BUDGET_FACTOR * sum(p.numel() for p in model.parameters())
                         + BUDGET_SLACK, path, "this model's size")
        return config, adapter, _tensors(header, meta, path)

    config, name, tensors = read_version(Path(path), read, _complete)
    check_values(tensors, path, strict)
    attach(model, config, name)
    fill_attached(model, name, tensors, trainable)
    return model


def _check_base(model: nn.Module, meta: dict[str, Any], path: Any, strict: bool) -> None:
    expected = meta["base_fingerprint"]
    check_targets_exist(model, meta["targets"], path)
    problems = compare(expected, fingerprint(model, list(meta["targets"])))
    if problems:
        msg = f"{path} was trained on a different base model: " + "; ".join(problems[:3])
        if strict:
            raise AdapterLoadError(msg + " (load_adapter(..., strict=False) loads it anyway)")
        warnings.warn(msg, stacklevel=3)


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    state = adapter_state(model, name)
    compare_shapes({k: tuple(p.shape) for k, p in state.items()},
                   {k: tuple(t.shape) for k, t in tensors.items()})
    with torch.no_grad():
        for key, param in state.items():
            param.copy_(tensors[key].to(param.dtype))
    for _, w in wrappers_of(model, [name]):  # loaded values: a data-driven init has nothing left to do
        if isinstance(w, DataInitialized):
            w.init_needs = None


def fill_attached(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], trainable: bool) -> None:
    """Copy `tensors` into the just-attached adapter `name` and activate it; on any failure the
    adapter is detached again, so a load that fails leaves the model as it was."""
    try:
        _copy_tensors(model, name, tensors)
    except BaseException:
        detach(model, name)
        raise
    set_trainable(model, name, trainable)
    activate(model, name)


def load_state_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy delta tensors (keys as in `adapter_state`) into attached adapter `name` (checked)."""
    if name not in adapters(model):
        raise AdapterStateError(f"unknown adapter {name!r}")
    _copy_tensors(model, name, tensors)


def swap_adapter(model: nn.Module, name: str, source: str | os.PathLike | Mapping[str, torch.Tensor],
                 strict: bool = True) -> nn.Module:
    """Replace adapter `name`'s tensors in place from an adapter folder or a state dict.

    The modules, their parameters (so optimisers and compiled graphs) and the activation stay;
    only values change. A folder is checked like `load_adapter` (checksum, method, config,
    targets, base fingerprint — a warning with strict=False); a state dict (keys as in
    `pk.adapter_state`) is checked for missing/unexpected keys and shapes. On any error nothing
    changes. A merged adapter is refused: unmerge it first.
    """
    check_known(model, [name])
    if any(w.merged for _, w in iter_deltas(model) if w.adapter_name == name):
        raise AdapterStateError(f"adapter {name!r} is merged into the base; unmerge it before swapping")
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise AdapterLoadError(f"state dict values must be tensors; {bad[0]!r} is {type(source[bad[0]]).__name__}")
        check_values(source, "state dict", strict)
        load_state_into(model, name, dict(source))
        return model
    expected = {k: tuple(p.shape) for k, p in adapter_state(model, name).items()}
    meta, tensors = read_adapter(source, expected,
                                 check=lambda meta: _check_same_kind(model, name, meta, source))
    _check_base(model, meta, source, strict)
    check_values(tensors, source, strict)
    load_state_into(model, name, tensors)
    return model


def _check_same_kind(model: nn.Module, name: str, meta: dict, source: object) -> None:
    record = adapters(model)[name]
    if meta["method"] != record.config.method:
        raise AdapterLoadError(f"{source} holds a {meta['method']!r} adapter; {name!r} is {record.config.method!r}")
    ours = record.config.to_dict()
    differ = sorted(k for k in set(ours) | set(meta["config"]) if ours.get(k) != meta["config"].get(k))
    if differ:
        raise AdapterLoadError(f"{source} has another config than {name!r} (fields {differ}); "
                               "hot-swap needs the same config: detach and load_adapter instead")
    if list(meta["targets"]) != list(record.targets):
        raise AdapterLoadError(f"{source} touches other modules than {name!r}; detach and load_adapter instead")
