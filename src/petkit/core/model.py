"""Attach, switch, disable, merge and unload named adapters on any nn.Module."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .capabilities import MergesOwnDeltas, TransformsOutput
from .delta import DeltaModule, innermost, unwrap, wrap
from .errors import AdapterStateError, ConfigError, TargetError
from .fingerprint import fingerprint
from .registry import MethodConfig
from .stacking import adapter_weights, apply_weights, check_weights
from .state import AdapterRecord, active_adapters, adapters, check_known, wrappers_of
from .targets import match_targets


class TrainableCopy(DeltaModule):
    """`modules_to_save`: a trainable full copy of a module (e.g. a new task head)."""

    def __init__(self, base: nn.Module, adapter_name: str) -> None:
        super().__init__(base, adapter_name)
        self.copy = copy.deepcopy(innermost(base))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.copy(*args, **kwargs) if self.enabled else self.base(*args, **kwargs)

    def merge_deltas(self) -> dict[str, torch.Tensor]:
        """copy - base; while merged, the difference that was added (the base holds the copy then)."""
        if not self.merged:
            base = innermost(self.base)
            self.__dict__["_merged"] = {n: p.detach() - base.get_parameter(n).detach()
                                        for n, p in self.copy.named_parameters()}
        return self.__dict__["_merged"]


def merge_deltas(wrapper: DeltaModule) -> dict[str, torch.Tensor]:
    """What merging `wrapper` adds to its innermost base's parameters, by parameter name."""
    if isinstance(wrapper, MergesOwnDeltas):
        return wrapper.merge_deltas()
    out = {"weight": wrapper.delta_weight(), "bias": wrapper.delta_bias()}
    return {k: v for k, v in out.items() if v is not None}


@contextlib.contextmanager
def _seeded_init(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Initial values drawn from generators seeded with `seed`, the caller's random state left as
    it was (CPU and the model's GPUs); None: torch's global generators, as they stand."""
    if seed is None:
        yield
        return
    gpus = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def _with_seed(config: MethodConfig, seed: int | None) -> MethodConfig:
    """A method that draws its init from its own generator (prompt tokens: the config's `seed`
    field) takes attach's seed there too, so the seed decides every method's init."""
    if seed is None:
        return config
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"attach: seed must be None or an int >= 0, got {seed!r}")
    if "seed" not in {f.name for f in dataclasses.fields(config)}:
        return config
    return dataclasses.replace(config, seed=seed)


def attach(model: nn.Module, config: MethodConfig, name: str = "default",
           seed: int | None = None) -> nn.Module:
    """Add adapter `name` described by `config` to `model` in place; freeze the base; activate it.
    With `seed`, the delta's initial values depend on the seed only (not on what drew random
    numbers before; a config's own `seed` field, e.g. prompt tuning's, is set to it), and the
    global random state is left unchanged."""
    if not isinstance(config, MethodConfig):
        raise ConfigError(f"attach needs a petkit method config (e.g. pk.LoraConfig), got {type(config).__name__}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConfigError(f"adapter name must be letters, digits, '_' or '-', got {name!r}")
    if name in adapters(model):
        raise AdapterStateError(f"an adapter named {name!r} is already attached; detach it or pick another name")
    config = _with_seed(config, seed)
    try:
        with _seeded_init(model, seed):
            touched = config.inject(model, name)
        if config.modules_to_save:
            for path in match_targets(model, list(config.modules_to_save), accept=lambda m: True, what="any"):
                wrap(model, path, TrainableCopy, name)
                touched.append(path)
    except BaseException:
        _removewrappers_of(model, name)
        raise
    adapters(model)[name] = AdapterRecord(name, config, touched, True, fingerprint(model, touched))
    activate(model, name)
    return model


def _removewrappers_of(model: nn.Module, name: str) -> None:
    for path, w in wrappers_of(model, [name]):
        if w.merged:
            _unmerge_one(w)
        unwrap(model, path, w)
    hooks = model.__dict__.get("_petkit_detach_hooks", {}).pop(name, [])
    for fn in hooks:
        fn()


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` (unmerging it first if merged)."""
    check_known(model, [name])
    _removewrappers_of(model, name)
    del adapters(model)[name]
    rest, kept = [n for n in active_adapters(model) if n != name], adapter_weights(model)
    activate(model, rest, [kept[n] for n in rest])
    return model


def activate(model: nn.Module, names: str | Sequence[str], weights: Sequence[float] | None = None) -> nn.Module:
    """Make exactly `names` the active adapters (a list stacks them), each scaled by its weight."""
    names = [names] if isinstance(names, str) else list(names)
    check_known(model, names)
    apply_weights(model, names, check_weights(model, names, weights))
    for _, w in wrappers_of(model):
        w.set_state(active=w.adapter_name in names)
    model.__dict__["_petkit_active"] = names
    _refresh_requires_grad(model)
    return model


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    check_known(model, [name])
    adapters(model)[name].trainable = trainable
    _refresh_requires_grad(model)


def _refresh_requires_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(model).values():
        p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{path: parameter} of the active, trainable adapters' deltas (paths as in named_parameters)."""
    records = adapters(model)
    chosen = {
        id(p)
        for _, w in wrappers_of(model, active_adapters(model))
        if records[w.adapter_name].trainable
        for local, p in w.delta_parameters().items()
        if local not in w.frozen_names
    }
    return {n: p for n, p in model.named_parameters() if id(p) in chosen}


def parameter_adapters(model: nn.Module) -> dict[str, str]:
    """{path: adapter name} of every attached adapter's delta parameters (paths as in
    named_parameters)."""
    owner = {id(p): w.adapter_name for _, w in wrappers_of(model) for p in w.delta_parameters().values()}
    return {n: owner[id(p)] for n, p in model.named_parameters() if id(p) in owner}


def trainable_copy_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The part of `trainable_parameters(model)` that belongs to full trainable copies
    (`modules_to_save`, e.g. a new task head), found by wrapper type, by path."""
    ids = {id(p) for _, w in wrappers_of(model) if isinstance(w, TrainableCopy)
           for p in w.delta_parameters().values()}
    return {n: p for n, p in trainable_parameters(model).items() if id(p) in ids}


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: the exact base model (merged adapters are unmerged). Restored after."""
    wrappers = wrappers_of(model)
    state = [(w, w.active, w.merged) for _, w in wrappers]
    for w, _, merged in state:
        if merged:
            _unmerge_one(w)
        w.set_state(active=False)
    try:
        yield model
    finally:
        for w, active, merged in state:
            w.set_state(active=active)
            if merged:
                _merge_one(w, merge_deltas(w))


def _check_mergeable(model: nn.Module, wrapper: DeltaModule) -> None:
    if not (wrapper.mergeable or isinstance(wrapper, MergesOwnDeltas)):
        raise AdapterStateError(
            f"adapter {wrapper.adapter_name!r} ({type(wrapper).__name__}) is not mergeable: its delta is not a weight change"
        )
    inner = wrapper.base
    while isinstance(inner, DeltaModule):
        if isinstance(inner, TransformsOutput) and inner.transforms_output and not inner.merged:
            raise AdapterStateError(
                f"cannot merge {wrapper.adapter_name!r}: it wraps {inner.adapter_name!r} "
                f"({type(inner).__name__}), which transforms its base's output; detach or reorder"
            )
        inner = inner.base


def _merge_one(wrapper: DeltaModule, deltas: dict[str, torch.Tensor]) -> None:
    base = innermost(wrapper.base)
    created: list[str] = []
    with torch.no_grad():
        for pname, delta in deltas.items():
            param = base.get_parameter(pname) if _has_param(base, pname) else None
            if param is None:  # e.g. a bias delta on a layer that had no bias
                param = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
                base.register_parameter(pname, param)
                created.append(pname)
            param.add_(delta.to(param.dtype))
    wrapper.__dict__["_created_params"] = created
    wrapper.set_state(merged=True)


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        return module.get_parameter(name) is not None
    except AttributeError:
        return False


def _unmerge_one(wrapper: DeltaModule) -> None:
    base = innermost(wrapper.base)
    created = wrapper.__dict__.get("_created_params", [])
    with torch.no_grad():
        for pname, delta in merge_deltas(wrapper).items():
            if pname in created:
                base._parameters[pname] = None  # back to "no bias", as before the merge
            else:
                param = base.get_parameter(pname)
                param.sub_(delta.to(param.dtype))
    wrapper.__dict__["_created_params"] = []
    wrapper.set_state(merged=False)


def merge(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Fold the named (default: active) adapters into the base weights. Merging twice is a no-op."""
    names = active_adapters(model) if names is None else list(names)
    check_known(model, names)
    todo = [w for _, w in wrappers_of(model, names) if not w.merged]
    for w in todo:
        _check_mergeable(model, w)
    deltas = []
    for w in todo:  # compute and check everything before changing anything
        d = merge_deltas(w)
        bad = [k for k, v in d.items() if not torch.isfinite(v).all()]
        if bad:
            raise AdapterStateError(f"adapter {w.adapter_name!r} holds NaN/inf in its {bad} delta; nothing was merged")
        deltas.append(d)
    for w, d in zip(todo, deltas):
        _merge_one(w, d)
    return model


def unmerge(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    names = list(adapters(model)) if names is None else list(names)
    check_known(model, names)
    for _, w in wrappers_of(model, names):
        if w.merged:
            _unmerge_one(w)
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every petkit module; with merge=True the active adapters are folded in first."""
    if merge and active_adapters(model):
        globals()["merge"](model)
    for name in list(adapters(model)):
        for path, w in wrappers_of(model, [name]):
            unwrap(model, path, w)  # merged ones stay in the weights
        for fn in model.__dict__.get("_petkit_detach_hooks", {}).pop(name, []):
            fn()
    for key in ("_petkit_adapters", "_petkit_active", "_petkit_detach_hooks"):
        model.__dict__.pop(key, None)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())  # a quantised base's packed integers cannot
    return model


def add_detach_hook(model: nn.Module, name: str, fn: Any) -> None:
    """Register cleanup to run when adapter `name` is detached or unloaded (e.g. remove a forward hook)."""
    model.__dict__.setdefault("_petkit_detach_hooks", {}).setdefault(name, []).append(fn)


def summary(model: nn.Module) -> str:
    """A table: where each delta sits (layers folded as `*`), its parameters, % of the base."""
    records = adapters(model)
    delta_ids = {id(p) for _, w in wrappers_of(model) for p in w.delta_parameters().values()}
    base_total = sum(p.numel() for p in model.parameters() if id(p) not in delta_ids)
    rows: dict[tuple[str, str, str, str], list[int]] = {}
    for path, w in wrappers_of(model):
        key = (w.adapter_name, re.sub(r"\.\d+\.", ".*.", path), type(w).__name__, "; ".join(w.notes))
        n = sum(p.numel() for p in w.delta_parameters().values())
        rows.setdefault(key, [0, 0])
        rows[key][0] += 1
        rows[key][1] += n
    active = set(active_adapters(model))
    lines = [f"{'adapter':<12} {'method':<10} {'where':<48} {'x':>4} {'params':>10}  notes"]
    for (name, where, kind, notes), (count, n) in rows.items():
        flag = "*" if name in active else " "
        lines.append(f"{flag}{name:<11} {records[name].config.method:<10} {where:<48} {count:>4} {n:>10,}  {kind} {notes}")
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    pct = 100.0 * trainable / max(base_total, 1)
    lines.append(f"trainable: {trainable:,} of base {base_total:,} ({pct:.4f}%) — active: {sorted(active) or 'none'}")
    return "\n".join(lines)


def delta_size(model: nn.Module, name: str) -> int:
    check_known(model, [name])
    return sum(p.numel() for _, w in wrappers_of(model, [name]) for p in w.delta_parameters().values())


def require_finite(x: float, what: str) -> None:
    if not math.isfinite(x):
        raise ConfigError(f"{what} must be finite, got {x}")


def no_targets_error(method: str, model: nn.Module) -> TargetError:
    return TargetError(f"{method} found nothing to apply to in {type(model).__name__}")


@contextlib.contextmanager
def keep_activation(model: nn.Module) -> Iterator[None]:
    """Restore the active adapters and their weights on exit (adapters detached inside drop out)."""
    saved, weights = active_adapters(model), adapter_weights(model)
    try:
        yield
    finally:
        kept = [n for n in saved if n in adapters(model)]
        activate(model, kept, [weights[n] for n in kept])
