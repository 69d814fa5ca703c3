"""Next-token choice per row: greedy at temperature 0, else temperature + top-p (nucleus) sampling
from the row's own seeded generator, so a seed gives the same answer whatever else is batched."""
from __future__ import annotations

import torch


def row_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by `seed` (a fresh random seed when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from one row's logits (vocab,)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ahead
        sorted_probs[before >= top_p] = 0.0  # keep the smallest set reaching top_p (always one)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
