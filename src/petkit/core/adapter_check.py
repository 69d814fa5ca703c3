"""Checks of a loaded adapter's config and tensors against the base model, before any allocation.

`exact_targets` turns a regex read from a file into the exact module paths the file records (a
regex from a file is never compiled: a hostile one could backtrack for minutes). `precheck`
bounds the config's sizes by what the file holds and by the targeted layers' dimensions, then
attaches the config to a *meta-device skeleton* of the model (module objects copied, no tensor
memory) and compares the adapter it would build with the file's tensors — so a rank of 10^7 is
refused without allocating a byte for it. `check_values` refuses NaN/inf and non-float tensors.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .capabilities import Ranked
from .delta import canonical_modules, iter_deltas, wrap
from .errors import AdapterLoadError, PetkitError
from .model import TrainableCopy
from .registry import MethodConfig
from .targets import match_targets

Shapes = Mapping[str, tuple[int, ...]]


def check_targets_exist(model: nn.Module, targets: list[str], where: object) -> None:
    """Every recorded target must be a module path of `model` (not an attribute, not absent)."""
    paths = {path for path, _, _ in canonical_modules(model)}
    missing = [p for p in targets if p not in paths]
    if missing:
        raise AdapterLoadError(
            f"{where} was made for another model (it does not fit this {type(model).__name__}): "
            f"field 'targets' names {len(missing)} path(s) that are not modules of it, "
            f"e.g. {missing[0]!r}")


def _target_fields(config: MethodConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(config)
            if f.name == "targets" or f.name.endswith("_targets")]


def _is_regex(value: Any) -> bool:
    return isinstance(value, str) and value != "all-linear"


def exact_targets(model: nn.Module, config: MethodConfig, recorded: list[str],
                  where: object) -> MethodConfig:
    """`config` with each regex target field replaced by the exact paths the file records."""
    regex = [f for f in _target_fields(config) if _is_regex(getattr(config, f))]
    if not regex:
        return config
    if len(regex) > 1:
        raise AdapterLoadError(f"{where}: config fields {regex} are all regexes; an adapter file "
                               "can hold at most one (regexes from files are not run)")
    field = regex[0]
    saved = set(_saved_copies(model, config))
    others = set()
    if len(_target_fields(config)) > 1:  # the other target fields' paths: a dry run without this one
        dry = dry_attach(model, dataclasses.replace(config, **{field: ()}), "__petkit_probe__")
        others = set(dry[0]) if dry is not None else set()
    own = tuple(p for p in recorded if p not in saved and p not in others)
    if not own:
        raise AdapterLoadError(f"{where}: field 'targets' records no module for config.{field}")
    return dataclasses.replace(config, **{field: own})


def _saved_copies(model: nn.Module, config: MethodConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    return match_targets(model, list(config.modules_to_save), accept=lambda m: True, what="any")


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def dry_attach(model: nn.Module, config: MethodConfig,
               name: str) -> tuple[list[str], dict[str, tuple[int, ...]]] | None:
    """(touched paths, {tensor key: shape}) `attach(model, config, name)` would give, computed
    on a meta skeleton; None when the method cannot be attached on the meta device."""
    try:
        skeleton = _skeleton(model)
        with torch.device("meta"):
            touched = list(config.inject(skeleton, name))
            for path in _saved_copies(skeleton, config):
                wrap(skeleton, path, TrainableCopy, name)
                touched.append(path)
    except PetkitError as exc:
        raise AdapterLoadError(f"the adapter's config does not fit this model: {exc}") from None
    except Exception:  # a method that cannot run on meta tensors: checked by the real attach
        return None
    shapes = {f"{path}.{local}" if path else local: tuple(p.shape)
              for path, w in iter_deltas(skeleton) if w.adapter_name == name
              for local, p in w.delta_parameters().items()}
    return touched, shapes


def compare_shapes(expected: Shapes, actual: Shapes) -> None:
    """Raise naming missing/unexpected keys or the first tensor whose shape differs."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(
            f"adapter tensors do not fit: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(actual[key]) != tuple(shape):
            raise AdapterLoadError(f"tensor {key!r} has shape {tuple(actual[key])} in the "
                                   f"file but {tuple(shape)} in the model")


def _max_dim(model: nn.Module, paths: list[str]) -> int:
    wanted, best = set(paths), 0
    for path, _, inner in canonical_modules(model):
        if path in wanted:
            for p in inner.parameters(recurse=False):
                best = max([best, *p.shape])
    return best


def check_sizes(model: nn.Module, config: MethodConfig, targets: list[str], numel: int,
                where: object) -> None:
    """Bound the config's integer sizes by the file's element count and `r` by the layers' dims."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, int) or "seed" in f.name or "step" in f.name:
            continue
        if value > max(numel, 1):
            raise AdapterLoadError(f"{where}: config.{f.name}={value} is larger than the "
                                   f"{numel} numbers the tensor file holds")
    rank, widest = config.r if isinstance(config, Ranked) else None, _max_dim(model, targets)
    if isinstance(rank, int) and widest and rank > widest:
        raise AdapterLoadError(f"{where}: config.r={rank} is above the dimensions of the layers it "
                               f"targets (largest {widest})")


def precheck(model: nn.Module, config: MethodConfig, name: str, targets: list[str],
             declared: Shapes, where: object) -> Shapes | None:
    """Everything about `config` that can be checked against the base without allocating, with
    `declared` the file's {tensor: shape} (from its header). Returns the shapes the adapter has
    on this model (None when the method cannot be built on the meta device)."""
    check_sizes(model, config, targets, sum(math.prod(s) for s in declared.values()), where)
    dry = dry_attach(model, config, name)
    if dry is None:
        return None
    touched, shapes = dry
    if set(touched) != set(targets):
        extra = sorted(set(touched) ^ set(targets))
        raise AdapterLoadError(f"{where}: field 'targets' does not match the modules its config "
                               f"selects in this model (differ: {extra[:3]})")
    return shapes


def check_values(tensors: Mapping[str, torch.Tensor], where: object, strict: bool) -> None:
    """Refuse (strict) or warn about non-float tensors and tensors holding NaN or inf."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            problem = f"tensor {key!r} has dtype {t.dtype}; adapter tensors are floating point"
        elif not bool(torch.isfinite(t).all()):
            problem = f"tensor {key!r} holds NaN or inf values"
        else:
            continue
        if strict:
            raise AdapterLoadError(f"{where}: {problem} (load_adapter(..., strict=False) loads it anyway)")
        warnings.warn(f"{where}: {problem}", stacklevel=3)
