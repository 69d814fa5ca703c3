"""The bench spec's value checks: mappings, unknown keys, label lists, sizes, shots, seeds and a
stacked arm's methods (each a clear ConfigError naming the spec key)."""
from __future__ import annotations

from typing import Any

from petkit.core.errors import ConfigError
from petkit.core.registry import make_config
from petkit.training.steppers.backprop import BackpropConfig

FULL = "full"


def as_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"bench spec: {where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def no_unknown(data: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"bench spec: {where} has unknown key(s) {unknown}; known: {list(known)}")


def label_ids(values: Any, where: str) -> tuple[int, ...]:
    ok = isinstance(values, list) and len(values) >= 2 and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in values)
    if not ok or len(set(values)) != len(values):
        raise ConfigError(f"bench spec: {where} must be a list of >= 2 distinct label ids, "
                          f"got {values!r}")
    return tuple(values)


def size_list(values: Any) -> tuple[int | None, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError("bench spec: sizes must be a non-empty list of ints >= 2 or 'full'")
    out: list[int | None] = []
    for v in values:
        if v == FULL:
            out.append(None)
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 2:
            out.append(v)
        else:
            raise ConfigError(f"bench spec: sizes entries must be ints >= 2 or 'full', got {v!r}")
    return tuple(out)


def sizes_or_shots(data: dict[str, Any]) -> tuple[int | None, ...]:
    """`sizes` (training examples), or `shots` (examples per class: ints >= 1)."""
    if "shots" not in data:
        return size_list(data.get("sizes", [64, 256, 1024, FULL]))
    if "sizes" in data:
        raise ConfigError("bench spec: give sizes (training examples) or shots (per class), not both")
    shots = data["shots"]
    if not isinstance(shots, list) or not shots or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in shots):
        raise ConfigError(f"bench spec: shots must be a non-empty list of ints >= 1, got {shots!r}")
    return tuple(shots)


def seed_list(values: Any) -> tuple[int, ...]:
    ok = isinstance(values, list) and values and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in values)
    if not ok or len(set(values)) != len(values):
        raise ConfigError(f"bench spec: seeds must be a list of distinct ints >= 0, got {values!r}")
    return tuple(values)


def stack_entries_of(value: Any, label: str, alone: bool) -> tuple[dict[str, Any], ...]:
    """A method entry's `stack: [{name: lora, r: 8, lr: 1.0e-3, adapter: lora}, ...]`: methods
    attached beside the arm's own (adapter "default"), each under `adapter` (default: its method
    name) and trained together, at its `lr` (default: the arm's)."""
    if value is None:
        return ()
    where = f"bench spec: {label}.stack"
    if alone:
        raise ConfigError(f"{where}: a stacked arm is a plain petkit arm (no kind peft, pretrain, "
                          "quantize or prune)")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of {{name: METHOD, ...}} entries, got {value!r}")
    stack, names = [], ["default"]
    for i, entry in enumerate(value):
        fields = as_mapping(entry, f"{label}.stack[{i}]")
        method, lr = fields.pop("name", None), fields.pop("lr", None)
        adapter = fields.pop("adapter", method)
        if not isinstance(method, str) or not method:
            raise ConfigError(f"{where}[{i}] needs a method name (name: lora), got {entry!r}")
        if not isinstance(adapter, str) or not adapter or adapter in names:
            raise ConfigError(f"{where}[{i}].adapter must be a name not used by another adapter of the "
                              f"arm ({names}), got {adapter!r}")
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr <= 10):
            raise ConfigError(f"{where}[{i}].lr must be a number in (0, 10], got {lr!r}")
        make_config(method, **fields)  # unknown method / bad field: ConfigError now
        names.append(adapter)
        stack.append({"name": method, "adapter": adapter, "options": fields,
                      "lr": None if lr is None else float(lr)})
    return tuple(stack)


def with_adapter_lr(stepper: Any, rates: dict[str, float], label: str) -> dict[str, Any]:
    """The arm's stepper section with `adapter_lr` set to the stacked adapters' rates."""
    own = {"name": stepper} if isinstance(stepper, str) else as_mapping(stepper, f"{label}.train.stepper")
    if own.get("name", "backprop") not in ("backprop", "auto"):
        raise ConfigError(f"bench spec: {label}.stack: a stacked method's lr needs the backprop stepper, "
                          f"not {own.get('name')!r}")
    given = BackpropConfig(adapter_lr=own.get("adapter_lr", ())).adapter_rates()  # any spelling it reads
    return {**own, "name": "backprop", "adapter_lr": {**given, **rates}}
