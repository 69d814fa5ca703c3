"""The delta-module contract: a wrapper keeps the original module as `base` and calls it.

Every petkit method that changes a module does it by replacing that module with a
`DeltaModule` whose `base` is the original. Wrappers stack (LoRA around an adapter around a
Linear); the *canonical path* of a wrapper is the path of the module it stands in for, so
adapter files do not depend on the order adapters were attached in.

A wrapper says which parameters are its own by structure: everything it holds except what
its `base` holds. Nothing is found by matching parameter names.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class DeltaModule(nn.Module):
    """Base of every petkit wrapper. Subclasses set up their delta and implement `forward`.

    Subclasses that are reparameterisations (their effect is a weight/bias change of the
    innermost base) override `delta_weight` and/or `delta_bias`; merge/unmerge are generic.
    Forwards must check `self.enabled` (a plain bool: cheap, and `torch.compile` guards on it).
    """

    def __init__(self, base: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base = base
        self.adapter_name = adapter_name
        self.active = True
        self.merged = False
        self.enabled = True  # active and not merged: the only flag a forward reads
        self.notes: list[str] = []  # shown by `summary` (e.g. "added zero bias")

    def set_state(self, *, active: bool | None = None, merged: bool | None = None) -> None:
        if active is not None:
            self.active = active
        if merged is not None:
            self.merged = merged
        self.enabled = self.active and not self.merged

    # local names of delta parameters saved with the adapter but never trained (an initialisation's
    # frozen offset, e.g. PiSSA's starting B0 A0): `trainable_parameters` leaves them out
    frozen_names: frozenset[str] = frozenset()

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """This wrapper's own parameters (local name -> parameter), excluding its base's."""
        base_ids = {id(p) for p in self.base.parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) not in base_ids}

    def delta_weight(self) -> torch.Tensor | None:
        """The change to `innermost(self).weight`, in that weight's layout; None if not mergeable."""
        return None

    def delta_bias(self) -> torch.Tensor | None:
        """The change to the innermost base's bias; None if the method changes no bias."""
        return None

    @property
    def mergeable(self) -> bool:
        cls = type(self)
        return cls.delta_weight is not DeltaModule.delta_weight or cls.delta_bias is not DeltaModule.delta_bias


def innermost(module: nn.Module) -> nn.Module:
    """Follow `.base` through stacked wrappers down to the original module."""
    while isinstance(module, DeltaModule):
        module = module.base
    return module


def canonical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield (canonical path, outermost module at that path, innermost base) for the base tree.

    A wrapper's own sub-modules (its delta) are not part of the base tree and are skipped.
    """

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
        inner = innermost(module)
        yield prefix, module, inner
        for name, child in inner.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", model)


def iter_deltas(model: nn.Module) -> Iterator[tuple[str, DeltaModule]]:
    """Yield (canonical path, wrapper) for every petkit wrapper, outermost first per path."""
    for path, outer, _ in canonical_modules(model):
        module = outer
        while isinstance(module, DeltaModule):
            yield path, module
            module = module.base


def get_canonical(model: nn.Module, path: str) -> nn.Module:
    """The outermost module at a canonical path."""
    module = model
    if path:
        for part in path.split("."):
            module = getattr(innermost(module), part)
    return module


def set_canonical(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the outermost module at a canonical path (the parent is reached through wrappers)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = innermost(get_canonical(model, parent_path))
    setattr(parent, leaf, new)


def wrap(model: nn.Module, path: str, make: "type[DeltaModule] | object", *args, **kwargs) -> DeltaModule:
    """Wrap the module at `path` (stacking on any wrapper already there) with `make(base, ...)`."""
    base = get_canonical(model, path)
    wrapper = make(base, *args, **kwargs)
    wrapper.train(base.training)  # a new wrapper follows the model's train/eval mode
    set_canonical(model, path, wrapper)
    return wrapper


def unwrap(model: nn.Module, path: str, wrapper: DeltaModule) -> None:
    """Take one wrapper out of the stack at `path`, wherever it sits in the stack."""
    outer = get_canonical(model, path)
    if outer is wrapper:
        set_canonical(model, path, wrapper.base)
        return
    while isinstance(outer, DeltaModule):
        if outer.base is wrapper:
            outer.base = wrapper.base
            return
        outer = outer.base
    raise RuntimeError(f"wrapper for {wrapper.adapter_name!r} not found at {path!r}")
