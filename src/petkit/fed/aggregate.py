"""Aggregation of client deltas: FedAvg weighted by examples, and the DP-FedAvg variant.

FedAvg (McMahan et al., 2017):   w' = sum_i n_i w_i / sum_i n_i
DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"):
    u_i = (w_i - w) * min(1, C / ||w_i - w||_2)          clip each client's whole update
    w'  = w + (sum_i u_i + N(0, (z C)^2 I)) / m           m = clients sampled this round
Weights are uniform under DP (a client's influence must be bounded by C, whatever it claims
about its data size), and m is the number sampled, not the number that answered, so a dropped
client lowers the signal, never the noise scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # payload imports Flower; `petkit fed --help` must not need it
    from petkit.fed.payload import State


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_i w_i s_i / sum_i w_i per key, computed in float64, returned in each key's dtype."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states, {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = {}
    for key, first in states[0].items():
        acc = sum(float(w) * s[key].astype(np.float64) for s, w in zip(states, weights))
        out[key] = (acc / total).astype(first.dtype)
    return out


def update_norm(state: State, reference: State) -> float:
    """L2 norm of (state - reference) over all tensors together."""
    return float(np.sqrt(sum(float(np.sum((state[k].astype(np.float64) - reference[k]) ** 2))
                             for k in reference)))


def clipped_update(state: State, reference: State, clip: float) -> tuple[State, float]:
    """(state - reference) scaled to norm <= clip, and the norm before clipping."""
    norm = update_norm(state, reference)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (state[k].astype(np.float64) - reference[k]) * scale for k in reference}, norm


def dp_average(states: Sequence[State], reference: State, clip: float, noise: float,
               sampled: int, rng: np.random.Generator) -> tuple[State, list[float]]:
    """DP-FedAvg step from `reference`; returns the new state and each update's pre-clip norm."""
    total = {k: np.zeros(v.shape, np.float64) for k, v in reference.items()}
    norms = []
    for state in states:
        update, norm = clipped_update(state, reference, clip)
        norms.append(norm)
        for k in total:
            total[k] += update[k]
    out = {}
    for k, ref in reference.items():
        noisy = total[k] + rng.normal(0.0, noise * clip, size=ref.shape) if noise > 0 else total[k]
        out[k] = (ref.astype(np.float64) + noisy / max(sampled, 1)).astype(ref.dtype)
    return out, norms
