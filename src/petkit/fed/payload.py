"""What travels: an adapter's delta tensors (the ones `pk.save_adapter` writes) as a Flower
`ArrayRecord`, the checks a received update must pass, and byte counts.

Keys are `petkit.core.io.adapter_state` keys (`<canonical module path>.<local name>`), so the
payload fits any registered method and the global adapter saved at the end is an ordinary
petkit adapter folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from torch import nn

from petkit.core.io import adapter_state, load_state_into

State = dict[str, np.ndarray]


def state_of(model: nn.Module, name: str) -> State:
    """Adapter `name`'s tensors as float numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in adapter_state(model, name).items()}


def to_record(state: State) -> ArrayRecord:
    """Numpy state -> ArrayRecord (keys kept in order)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    """ArrayRecord -> numpy state (raises on undecodable arrays)."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def load_into(model: nn.Module, name: str, state: State) -> None:
    """Copy a numpy state into adapter `name` (keys and shapes checked by petkit)."""
    load_state_into(model, name, {k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays in a record (what a message carries for it)."""
    return sum(len(a.data) for a in record.values())


@dataclass(frozen=True)
class Spec:
    """Expected keys, shapes and dtypes of an update: taken from the global adapter."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def of(cls, state: State) -> Spec:
        """The spec an update must match to be averaged with `state`."""
        return cls({k: tuple(v.shape) for k, v in state.items()}, {k: str(v.dtype) for k, v in state.items()})


def short_reason(text: str, keep: int = 240) -> str:
    """A client's error text without colour codes and tracebacks' bulk: its last `keep` chars."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return text if len(text) <= keep else "... " + text[-keep:]


class RejectedUpdate(Exception):
    """A client's reply that cannot be aggregated; the message says why."""


def check_reply(msg: Message, spec: Spec, key: str = "arrays",
                decode: Callable[[State], State] | None = None) -> tuple[State, float]:
    """(state, num_examples) of a training reply, or RejectedUpdate naming what is wrong.

    `decode` turns what the client sent into its delta (compressed updates); a ValueError from
    it rejects the update.
    """
    if msg.has_error():
        raise RejectedUpdate(f"client failed: {short_reason(msg.error.reason)}")
    content = msg.content
    if key not in content.array_records:
        raise RejectedUpdate(f"no ArrayRecord {key!r} in the reply (records: {list(content.keys())})")
    try:
        state = from_record(content.array_records[key])
    except Exception as err:  # noqa: BLE001 - any decoding failure is the client's fault
        raise RejectedUpdate(f"malformed arrays: {type(err).__name__}: {err}") from None
    if decode is not None:
        if not any(k in state for k in spec.shapes):  # a compressed reply: codec arrays only
            try:
                state = decode(state)
            except ValueError as err:
                raise RejectedUpdate(f"malformed compressed update: {err}") from None
        else:  # a plain delta relative to the broadcast: its keys and shapes are checked first
            _check_state(state, spec)
            state = decode(state)
    _check_state(state, spec)
    return state, _num_examples(msg)


def _check_state(state: State, spec: Spec) -> None:
    missing = sorted(set(spec.shapes) - set(state))
    unexpected = sorted(set(state) - set(spec.shapes))
    if missing or unexpected:
        raise RejectedUpdate(f"keys do not fit the global adapter: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != spec.shapes[k]:
            raise RejectedUpdate(f"tensor {k!r} has shape {tuple(v.shape)}, expected {spec.shapes[k]}")
        if str(v.dtype) != spec.dtypes[k]:
            raise RejectedUpdate(f"tensor {k!r} has dtype {v.dtype}, expected {spec.dtypes[k]}")
        if not np.isfinite(v).all():
            raise RejectedUpdate(f"tensor {k!r} holds NaN or inf")


def _num_examples(msg: Message) -> float:
    records = list(msg.content.metric_records.values())
    value = records[0].get("num-examples") if records else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RejectedUpdate(f"num-examples must be a number > 0, got {value!r}")
    return float(value)
