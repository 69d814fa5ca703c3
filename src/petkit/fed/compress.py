"""Compressed client updates: what a client sends is its *update* (local delta - global delta),
quantised or sparsified, with error feedback kept on the client.

    fed: {compress: int8}        per-tensor symmetric int8:  q = round(u / s), s = max|u| / 127
    fed: {compress: "topk:0.1"}  the 10% largest-magnitude entries of each tensor (int32 index,
                                 float16 value); the rest is zero
Error feedback (Seide et al., 2014; Stich et al., 2018, "Sparsified SGD with Memory"): the part
of `u + e` that compression dropped is the client's new residual `e`, added to its next update,
so nothing is lost for good, only delayed. The server decodes each reply to a dense update,
adds the global delta it sent, and from there checks and averages as without compression.

Wire format (one Flower ArrayRecord of two arrays; tensors in sorted key order, concatenated):
    int8:  "int8-values" int8 (all entries), "int8-scales" float32 (one per tensor)
    topk:  "topk-indices" int32 (offsets into the concatenation), "topk-values" float16
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from petkit.core.errors import ConfigError

State = dict[str, np.ndarray]
Q, SCALE, IDX, VAL = "int8-values", "int8-scales", "topk-indices", "topk-values"


@dataclass(frozen=True)
class Compression:
    """How updates travel: "none", "int8" or "topk" with the kept `fraction`."""

    kind: str = "none"
    fraction: float = 1.0

    @classmethod
    def parse(cls, text: str | None) -> Compression:
        """"none" | "int8" | "topk:P" (0 < P <= 1) -> Compression; anything else a ConfigError."""
        text = "none" if text in (None, "") else str(text).strip().lower()
        if text in ("none", "int8"):
            return cls(text)
        kind, _, share = text.partition(":")
        try:
            fraction = float(share)
        except ValueError:
            fraction = float("nan")
        if kind != "topk" or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fed.compress must be none, int8 or topk:P with 0 < P <= 1 "
                              f"(e.g. topk:0.1), got {text!r}")
        return cls("topk", fraction)

    @property
    def active(self) -> bool:
        """Whether updates are compressed at all."""
        return self.kind != "none"


def encode(update: State, how: Compression) -> tuple[State, State]:
    """(arrays to send, what was dropped) for a dense update; dropped is the new residual.

    Every tensor is compressed on its own (its own int8 scale, its own top-k), and the results
    are concatenated in sorted key order into two arrays, so a message carries two array
    headers whatever the number of adapted layers.
    """
    keys = sorted(update)
    flats = [update[k].astype(np.float32).ravel() for k in keys]
    offsets = np.cumsum([0] + [f.size for f in flats])
    parts, kept = [], []
    for flat, start in zip(flats, offsets[:-1]):
        if how.kind == "int8":
            scale = float(np.abs(flat).max()) / 127.0 if flat.size else 0.0
            q = np.round(flat / scale).astype(np.int8) if scale > 0 else np.zeros(flat.shape, np.int8)
            parts.append((q, np.float32(scale)))
            kept.append(q.astype(np.float32) * np.float32(scale))
        else:
            k = max(1, int(round(how.fraction * flat.size))) if flat.size else 0
            idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]) if k else np.zeros(0, int)
            val = flat[idx].astype(np.float16)
            parts.append(((idx + start).astype(np.int32), val))
            dense = np.zeros_like(flat)
            dense[idx] = val.astype(np.float32)
            kept.append(dense)
    first, second = zip(*parts) if parts else ((), ())
    if how.kind == "int8":
        sent = {Q: np.concatenate(first) if first else np.zeros(0, np.int8),
                SCALE: np.array(second, np.float32)}
    else:
        sent = {IDX: np.concatenate(first) if first else np.zeros(0, np.int32),
                VAL: np.concatenate(second) if second else np.zeros(0, np.float16)}
    dropped = {k: (f - d).reshape(update[k].shape) for k, f, d in zip(keys, flats, kept)}
    return sent, dropped


def decode(sent: State, shapes: dict[str, tuple[int, ...]], how: Compression) -> State:
    """The dense float32 update a client's arrays stand for; ValueError if they do not fit."""
    keys = sorted(shapes)
    sizes = [int(np.prod(shapes[k])) for k in keys]
    total = sum(sizes)
    wanted = {Q, SCALE} if how.kind == "int8" else {IDX, VAL}
    if set(sent) != wanted:
        raise ValueError(f"compressed arrays must be {sorted(wanted)}, got {sorted(sent)}")
    if how.kind == "int8":
        q, scale = sent[Q], sent[SCALE]
        if q.dtype != np.int8 or q.shape != (total,) or scale.shape != (len(keys),) or \
                not np.isfinite(scale).all():
            raise ValueError(f"int8 update: {total} int8 values and {len(keys)} finite scales expected")
        flat = q.astype(np.float32) * np.repeat(scale.astype(np.float32), sizes)
    else:
        idx, val = sent[IDX], sent[VAL]
        if idx.dtype != np.int32 or val.dtype != np.float16 or idx.shape != val.shape or idx.ndim != 1 \
                or (idx.size and (idx.min() < 0 or idx.max() >= total)):
            raise ValueError(f"top-k update: int32 indices in [0, {total}) with one float16 value each expected")
        flat = np.zeros(total, np.float32)
        flat[idx] = val.astype(np.float32)
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if keys else []
    return {k: p.reshape(shapes[k]) for k, p in zip(keys, pieces)}
